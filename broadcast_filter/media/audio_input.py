"""Sound from an audio device beside a camera or screen capture (the ``audio=`` option).

A capture source's picture and sound usually come from different devices: a webcam and a
USB microphone, a capture card's video and its audio interface, the screen and the desktop
sound. ``audio=FORMAT:DEVICE`` names the sound's FFmpeg input device, opened as a second
PyAV input and read by a thread of its own:

* Linux: ``alsa:default``, ``alsa:hw:1`` (PulseAudio and PipeWire serve ALSA's ``default``);
* Windows: ``dshow:audio=Microphone (USB Audio)`` (``broadcast-filter devices`` lists names);
* macOS: ``avfoundation::0`` (``:INDEX``: audio device INDEX, no video);
* anywhere, for tests and demos: ``lavfi:sine=f=440,arealtime``.

Chunks are stamped on the monotonic clock through the device's own timestamps
(:class:`~broadcast_filter.media.audio.MediaClock`), so the stamps do not jitter with the
reading thread. Their offset is the smallest seen (no chunk is stamped after it arrived),
not the first chunk's: through PulseAudio's ALSA plugin FFmpeg dates the first second's
reads ~0.5 s too early before its time filter settles (~2 s), and an anchor on the first
chunk kept that error for good. A device that fails is said once on the audio state; the
picture goes on.

PyAV's Linux wheels bundle a libasound built to find its configuration and plugins under
its build tree (``/tmp/vendor``): as shipped it knows no ALSA device, not even ``default``,
and cannot load the PulseAudio/PipeWire plugin. :func:`use_system_alsa` points it at the
system's (``ALSA_CONFIG_DIR``, ``ALSA_PLUGIN_DIR``) unless they are set already.
"""

from __future__ import annotations

import os
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path

import av
import av.error

from broadcast_filter.media.audio import (
    AudioChunk,
    AudioConverter,
    MediaClock,
    describe,
    stream_format,
)
from broadcast_filter.media.base import MediaError


def parse_audio_device(value: str) -> tuple[str, str]:
    """``"alsa:default"`` -> ``("alsa", "default")``; a MediaError says what is accepted."""
    fmt, sep, device = value.partition(":")
    if not sep or not fmt:
        raise MediaError(
            f"audio={value!r}: give FORMAT:DEVICE, e.g. alsa:default, "
            "dshow:audio=Microphone, avfoundation::0"
        )
    if fmt not in av.formats_available:
        have = ", ".join(f for f in ("alsa", "pulse", "dshow", "avfoundation", "oss", "lavfi")
                         if f in av.formats_available)  # fmt: skip
        raise MediaError(f"audio={value!r}: this PyAV has no {fmt!r} input (it has: {have})")
    return fmt, device


def use_system_alsa() -> None:
    """Let a libasound bundled with PyAV (``av.libs/``) read the system's ALSA configuration
    and plugins; nothing where PyAV uses the system's libasound or the variables are set.
    Called before the first ALSA device is opened: libasound reads them once."""
    libs = Path(av.__file__).resolve().parent.parent / "av.libs"
    if not any(libs.glob("libasound*")):
        return
    if Path("/usr/share/alsa/alsa.conf").is_file():
        os.environ.setdefault("ALSA_CONFIG_DIR", "/usr/share/alsa")
    multiarch = sysconfig.get_config_var("MULTIARCH") or "-"
    for folder in (f"/usr/lib/{multiarch}/alsa-lib", "/usr/lib64/alsa-lib", "/usr/lib/alsa-lib"):
        if any(Path(folder).glob("libasound_module_pcm_*.so")):
            os.environ.setdefault("ALSA_PLUGIN_DIR", folder)
            break


class AudioInput:
    """One audio input device, decoded to chunks in its own rate and channels for ``emit``
    by a thread."""

    def __init__(self, value: str, emit: Callable[[AudioChunk], None]) -> None:
        self.input_format, self.device = parse_audio_device(value)
        self.label = value
        self._emit = emit
        if self.input_format == "alsa":
            use_system_alsa()
        try:
            self._container = av.open(self.device, format=self.input_format, timeout=(5.0, 2.0))
        except av.error.FFmpegError as exc:
            raise MediaError(f"cannot open the audio device {value!r}: {exc}") from exc
        if not self._container.streams.audio:
            self._container.close()
            raise MediaError(f"the audio device {value!r} has no audio stream")
        self._stream = self._container.streams.audio[0]
        self.state = describe(self._stream.codec_context)
        #: ``(rate, channels)`` its chunks come in (the device's own)
        self.format = stream_format(self._stream.codec_context)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"audio {value}", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def _run(self) -> None:
        clock, converter = MediaClock(), AudioConverter()
        try:
            for frame in self._container.decode(self._stream):
                if self._stop.is_set():
                    break
                samples = converter.convert(frame)
                if len(samples):
                    # the smallest offset seen, not the first (see the module's docstring)
                    at = clock.video(frame.time, time.monotonic())
                    self._emit(AudioChunk(samples, at, converter.rate))
        except (av.error.FFmpegError, OSError) as exc:
            if not self._stop.is_set():
                self.state = f"{self.state}, stopped ({exc}); the picture goes on"
        finally:
            self._container.close()  # only here: closing under a blocked read crashes FFmpeg

    def close(self) -> None:
        """Stop reading (a device read returns within a period, ~20 ms)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)
        elif not self._thread.ident:
            self._container.close()
