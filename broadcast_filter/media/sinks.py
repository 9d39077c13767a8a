"""Local sinks: a virtual camera (pyvirtualcam), an H.264 file (PyAV) and a null sink.

Each sink is an independent object opened for one size and rate; the runtime may feed
several at once. ``send`` takes ``(height, width, 3)`` uint8 RGB and returns promptly.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import av
import numpy as np
import pyvirtualcam
from pyvirtualcam.camera import BACKENDS

from .aac import AacTrack, CopyTrack
from .audio import AUDIO_BITRATE, CHANNELS, RATE, CodedAudio
from .base import MediaError, Sink, audio_track
from .h264 import SEND_TIME_BASE, add_h264_stream, send_time_pts
from .sources import Device

log = logging.getLogger(__name__)


class NullSink(Sink):
    """Counts frames and drops them: for benchmarks and dry runs."""

    kind: ClassVar[str] = "null"

    def __init__(self, *, width: int, height: int, fps: float) -> None:
        super().__init__(width=width, height=height, fps=fps)
        self.frames = 0

    def send(self, image: np.ndarray, at: float | None = None) -> None:
        self.check(image)
        self.frames += 1


def virtual_camera_hint(system: str | None = None) -> str:
    """What to install so that pyvirtualcam finds a virtual camera on ``system``."""
    system = system or platform.system()
    if system == "Linux":
        return (
            "Install v4l2loopback and load it, e.g.: sudo apt install v4l2loopback-dkms && "
            'sudo modprobe v4l2loopback devices=1 video_nr=10 card_label="broadcast-filter" '
            "exclusive_caps=1  (then use vcam:/dev/video10)"
        )
    if system in ("Windows", "Darwin"):
        return (
            "Install OBS Studio 28 or newer and start its Virtual Camera once "
            "(Controls > Start Virtual Camera) so that the system camera is installed."
        )
    return f"pyvirtualcam has no virtual camera backend for {system}."


class VirtualCameraSink(Sink):
    """A virtual camera that OBS, Zoom or a browser can pick, through pyvirtualcam.

    ``backend`` is a pyvirtualcam backend name (``v4l2loopback``, ``obs``, ``unitycapture``;
    default: the first that works) and ``device`` the camera to use (``/dev/video10``).
    Opening fails with what to install when no virtual camera is there, so a daemon
    configured for one refuses to start instead of streaming into nothing.
    """

    kind: ClassVar[str] = "vcam"

    def __init__(
        self,
        *,
        width: int,
        height: int,
        fps: float,
        device: str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(width=width, height=height, fps=fps)
        if backend is not None and backend not in BACKENDS:
            raise MediaError(
                f"unknown virtual camera backend {backend!r}; "
                f"this machine has: {', '.join(BACKENDS) or 'none'}. {virtual_camera_hint()}"
            )
        tried = f"backend={backend or ', '.join(BACKENDS) or 'none registered'}"
        if device:
            tried += f", device={device}"
        try:
            self._camera = pyvirtualcam.Camera(
                width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB, device=device, backend=backend
            )
        except RuntimeError as e:
            raise MediaError(
                f"no virtual camera could be opened ({tried}):\n{e}\n{virtual_camera_hint()}"
            ) from e
        self.backend, self.device = self._camera.backend, self._camera.device

    def send(self, image: np.ndarray, at: float | None = None) -> None:
        self.check(image)
        self._camera.send(image)

    def close(self) -> None:
        self._camera.close()


def list_virtual_cameras(width: int = 640, height: int = 480, fps: float = 30) -> list[Device]:
    """Open each pyvirtualcam backend briefly; list those that work, or why none does."""
    found, errors = [], []
    for name in list(BACKENDS):
        try:
            with pyvirtualcam.Camera(width, height, fps, backend=name) as camera:
                found.append(Device("vcam", f"vcam:{camera.device}?backend={name}", camera.device))
        except RuntimeError as e:
            errors.append(f"{name}: {str(e).rstrip('.')}")
    if found:
        return found
    reason = "; ".join(errors) or "pyvirtualcam has no backend registered on this OS"
    return [Device("vcam", "vcam", "virtual camera", False, f"{reason}. {virtual_camera_hint()}")]


class FileSink(Sink):
    """H.264 (and AAC audio) into MP4 or MKV that stays playable if the process dies mid-recording.

    MP4 is written fragmented (``frag_keyframe+empty_moov+default_base_moof``) and MKV as
    clusters, with a keyframe every ``gop`` frames (default: one second) and every packet
    flushed to the OS: a file cut off by SIGKILL or a crash decodes up to the last complete
    fragment. Without audio frame ``n`` gets ``pts = n`` in a ``1/fps`` time base.

    With ``audio="aac"`` the file gets an AAC track at ``audio_bitrate`` in ``audio_format``
    (``(rate, channels)``: the source's where it is known when the file opens, else 48 kHz
    stereo; audio in another format is converted to it, a file cannot change format) and
    both tracks share one timeline from the first :meth:`send` or :meth:`send_audio`
    (``t0``): a frame on air at ``at`` (given to :meth:`send`; else its send time) gets
    ``pts = round((at - t0) * 90000)`` in ``1/90000`` (the time itself: frame numbers
    would round a late frame, and every later one, onto the next slot), and audio is
    placed by the time it goes on air (:class:`~broadcast_filter.media.aac.AacTrack`);
    audio due before ``t0`` is cut.
    """

    kind: ClassVar[str] = "file"
    CONTAINERS: ClassVar[dict[str, tuple[str, dict[str, str]]]] = {
        ".mp4": ("mp4", {"movflags": "frag_keyframe+empty_moov+default_base_moof"}),
        ".mkv": ("matroska", {}),
    }
    #: the muxer waits at most this long (µs) for the other track before writing: an audio
    #: track that gets no samples must not hold the video back (FFmpeg's default: 10 s)
    INTERLEAVE_US: ClassVar[str] = "500000"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        width: int,
        height: int,
        fps: float,
        codec: str = "libx264",
        preset: str = "veryfast",
        crf: int = 23,
        gop: int | None = None,
        audio: str = "off",
        audio_bitrate: int = AUDIO_BITRATE,
        audio_format: tuple[int, int] = (RATE, CHANNELS),
    ) -> None:
        super().__init__(width=width, height=height, fps=fps)
        self.path = Path(path)
        self.label = str(self.path)
        self.audio = audio_track(audio, self.label)
        suffix = self.path.suffix.lower()
        if suffix not in self.CONTAINERS:
            raise MediaError(f"cannot record to {self.path}: use a .mp4 or .mkv file name")
        if width % 2 or height % 2:
            raise MediaError(f"H.264 4:2:0 needs an even width and height, got {width}x{height}")
        fmt, options = self.CONTAINERS[suffix]
        options = {**options, "flush_packets": "1", "max_interleave_delta": self.INTERLEAVE_US}
        try:
            self._container = av.open(str(self.path), "w", format=fmt, options=options)
            self._stream = add_h264_stream(
                self._container,
                width=width,
                height=height,
                fps=fps,
                gop=gop or max(1, round(fps)),
                preset=preset,
                rate_control={"crf": str(crf)},
                codec=codec,
                time_base=SEND_TIME_BASE if self.audio else None,
            )
            kind = CopyTrack if self.audio == "copy" else AacTrack
            self._track = (
                kind(self._container, int(audio_bitrate), *audio_format) if self.audio else None
            )
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise MediaError(f"cannot record to {self.path} ({fmt}, {codec}): {e}") from e
        # one RGB frame, refilled in place for every send (the encoder converts it to yuv420p)
        self._frame = av.VideoFrame(width, height, "rgb24")
        line = self._frame.planes[0].line_size
        self._pixels = np.frombuffer(self._frame.planes[0], np.uint8).reshape(height, line)
        self._pixels = self._pixels[:, : width * 3].reshape(height, width, 3)
        self.frames = 0
        self._t0: float | None = None  # with audio: the time both tracks count from
        self._pts = -1

    def send(self, image: np.ndarray, at: float | None = None) -> None:
        self.check(image)
        self._pixels[...] = image
        if self.audio:
            at = time.monotonic() if at is None else at
            self._t0 = at if self._t0 is None else self._t0
            self._pts = send_time_pts(self._pts, at, self._t0)
        else:
            self._pts = self.frames
        self._frame.pts = self._pts
        self._frame.time_base = self._stream.codec_context.time_base
        self._container.mux(self._stream.encode(self._frame))
        self.frames += 1

    def send_audio(
        self,
        samples: np.ndarray,
        at: float,
        rate: int = RATE,
        coded: Sequence[tuple[CodedAudio, float]] = (),
    ) -> None:
        """Encode samples on the video's timeline (:class:`.aac.AacTrack`), or copy the
        source's frames (:class:`.aac.CopyTrack`); a file keeps the format it was opened
        with (samples in another are converted to it, frames in another are not copied)."""
        if self._track is None:
            return
        self._t0 = at if self._t0 is None else self._t0
        if isinstance(self._track, CopyTrack):
            for frame, on_air in coded:
                if self._track.fits_coded(frame):
                    self._container.mux(self._track.add_coded(frame, on_air, self._t0))
        self._container.mux(self._track.add(samples, at, self._t0, rate))

    def close(self) -> None:
        try:
            self._container.mux(self._stream.encode(None))
            if self._track is not None:
                self._container.mux(self._track.flush())
        except (av.error.FFmpegError, OSError) as e:
            log.warning("recording %s: last frames lost: %s", self.path, e)
        try:
            self._container.close()
        except (av.error.FFmpegError, OSError) as e:
            log.warning("recording %s: not closed cleanly (still playable): %s", self.path, e)
