"""Local sources through PyAV: test pattern, video file, capture device and screen.

Every source converts on its own thread (the one iterating :meth:`frames`) to RGB at the
engine's size with :class:`~broadcast_filter.media.convert.FrameConverter`. ``close()`` may be
called from another thread: the running ``frames()`` stops at the next frame.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import glob
import logging
import os
import platform
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import av
import numpy as np

from .aac import coded_frame, stream_config
from .audio import AudioChunk, AudioConverter, CodedAudio, describe, stream_format
from .audio_input import AudioInput
from .base import AudioListener, CodedListener, Frame, MediaError, Source, SourceLost
from .convert import FitPolicy, FrameConverter
from .rate import frame_rate

#: Live inputs (capture devices, screens, network streams): probe as little as the demuxer
#: needs, so the open returns as soon as data flows and no frame is read ahead and arrives
#: stale. 32 KiB holds what a network stream needs before its parameters are known
#: (MPEG-TS: the PAT/PMT and the first keyframe's SPS; FLV: the metadata and the sequence
#: header); a capture device delivers a whole frame per packet, so it stops after the first
#: packet either way. analyzeduration 0: take the stream parameters from what was probed.
LIVE_PROBE = {"probesize": "32768", "analyzeduration": "0"}

log = logging.getLogger(__name__)

#: a file whose audio runs this far (seconds) ahead of its first video frame is paced from
#: its audio (the audio would otherwise wait for that frame)
LEAD_S = 0.5

#: counter bits drawn by the test pattern (wraps after 2**24 frames, 6 days at 30 fps)
COUNTER_BITS = 24


@dataclass(frozen=True)
class InputSpec:
    """What ``av.open`` is given: demuxer, URL and options. Errors print it as 'what was tried'."""

    format: str | None
    url: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = "".join(f" {k}={v}" for k, v in self.options.items())
        return f"{self.format or 'auto'} {self.url!r}{opts}"


@dataclass(frozen=True)
class Device:
    """A camera, screen or virtual camera on this machine, as the ``devices`` command lists it."""

    kind: str  # "camera" | "screen" | "vcam"
    url: str  # what to pass as the source or sink URL
    name: str
    available: bool = True
    note: str = ""


class Pacer:
    """Release frames at their media time: frame time ``t`` is due at ``anchor + t``.

    When the caller falls behind by more than ``max_lag`` seconds the clock is re-anchored,
    so a stall is followed by normal pacing instead of a burst.
    """

    def __init__(self, max_lag: float = 0.5) -> None:
        self.max_lag = max_lag
        self._anchor: float | None = None

    def wait(self, t: float) -> None:
        now = time.monotonic()
        if self._anchor is None or now - (self._anchor + t) > self.max_lag:
            self._anchor = now - t
            return
        delay = self._anchor + t - now
        if delay > 0:
            time.sleep(delay)

    def due(self, t: float) -> float:
        """The ``time.monotonic()`` at which media time ``t`` is (or was) due; the first call
        anchors the clock at ``t`` = now if :meth:`wait` has not."""
        if self._anchor is None:
            self._anchor = time.monotonic() - t
        return self._anchor + t


def draw_counter(image: np.ndarray, value: int) -> None:
    """Draw ``value`` as a row of black/white blocks (LSB first) along the top-left edge."""
    b = _block(image)
    for bit in range(COUNTER_BITS):
        image[:b, bit * b : (bit + 1) * b] = 255 if value >> bit & 1 else 0


def read_counter(image: np.ndarray) -> int:
    """Read back the value drawn by :func:`draw_counter` (survives mild compression)."""
    b = _block(image)
    centres = image[b // 2, b // 2 : COUNTER_BITS * b : b].mean(axis=-1)
    return sum(1 << bit for bit, v in enumerate(centres) if v > 127)


def _block(image: np.ndarray) -> int:
    b = min(image.shape[1] // COUNTER_BITS, image.shape[0] // 4)
    if b < 2:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} too small for a frame counter")
    return b


def _open_input(spec: InputSpec, what: str, hint: str) -> av.container.InputContainer:
    if spec.format is not None and spec.format not in _demuxers():
        raise MediaError(
            f"cannot open {what}: this PyAV build has no '{spec.format}' input "
            f"({platform.system()}). Tried: {spec}. {hint}"
        )
    try:
        return av.open(spec.url, format=spec.format, options=spec.options)
    except (av.error.FFmpegError, OSError) as e:
        raise MediaError(f"cannot open {what}: {e}. Tried: {spec}. {hint}") from e


def _demuxers() -> set[str]:
    # av.formats_available names some demuxers with aliases, e.g. "video4linux2,v4l2"
    return {name for entry in av.formats_available for name in entry.split(",")}


class _PyAVSource(Source):
    """A source reading the first video stream of one PyAV input."""

    def __init__(self, *, width: int, height: int, fit: FitPolicy) -> None:
        self._converter = FrameConverter(width, height, fit)
        self._container: av.container.InputContainer | None = None
        self._stop = False
        self._running = False
        self._release_lock = threading.Lock()

    def _decode(self, container: av.container.InputContainer) -> Iterator[av.VideoFrame]:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if self._stop:
                return
            yield frame

    def frames(self) -> Iterator[Frame]:
        self._running = True
        try:
            yield from self._frames()
        finally:
            self._running = False
            self._release()

    @abc.abstractmethod
    def _frames(self) -> Iterator[Frame]:
        """Yield converted frames from ``self._container`` (or its successors)."""

    def close(self) -> None:
        self._stop = True
        if not self._running:
            self._release()

    def _release(self) -> None:
        # close() (another thread) and the end of frames() may both get here at once: the
        # container is taken under a lock, so it is closed exactly once (a double close
        # crashes FFmpeg)
        with self._release_lock:
            container, self._container = self._container, None
        if container is not None:
            container.close()


class FittedSource(Source):
    """Fit the frames of a source that keeps its native size (network, NDI) to the engine's size.

    Frames already at ``width x height`` pass through untouched; others go through swscale.
    Other attributes (``state``, ``label``, ...) are those of the wrapped ``source``.
    """

    def __init__(self, source: Source, *, width: int, height: int, fit: FitPolicy) -> None:
        self.source = source
        self._converter = FrameConverter(width, height, fit)

    def frames(self) -> Iterator[Frame]:
        size = (self._converter.height, self._converter.width)
        for frame in self.source.frames():
            if frame.image.shape[:2] == size:
                yield frame
            else:
                rgb = av.VideoFrame.from_ndarray(frame.image, format="rgb24")
                yield Frame(self._converter.convert(rgb), frame.captured_at, frame.index)

    @property  # type: ignore[override]
    def carries_audio(self) -> bool:  # the wrapped source's, audio is not fitted
        return self.source.carries_audio

    @property  # type: ignore[override]
    def audio_state(self) -> str:
        return self.source.audio_state

    @property  # type: ignore[override]
    def audio_format(self) -> tuple[int, int] | None:
        return self.source.audio_format

    def listen_audio(self, listener: AudioListener | None) -> None:
        self.source.listen_audio(listener)

    def listen_coded(self, listener: CodedListener | None) -> None:
        self.source.listen_coded(listener)

    def close(self) -> None:
        self.source.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self.source, name)


class TestPatternSource(_PyAVSource):
    """FFmpeg's ``testsrc2`` pattern, paced to real time, with an optional frame counter.

    ``size`` and ``rate`` are the pattern's own (default: the engine's ``width x height`` and
    ``fps``); the pattern is then fitted to ``width x height`` like any other source.
    """

    kind: ClassVar[str] = "testsrc"

    def __init__(
        self,
        *,
        width: int,
        height: int,
        fps: float,
        fit: FitPolicy = "crop",
        size: tuple[int, int] | None = None,
        rate: float | None = None,
        counter: bool = True,
    ) -> None:
        super().__init__(width=width, height=height, fit=fit)
        pw, ph = size or (width, height)
        self.spec = InputSpec("lavfi", f"testsrc2=size={pw}x{ph}:rate={frame_rate(rate or fps)}")
        self._counter = counter
        self._container = _open_input(self.spec, "the test pattern", "Check size and rate.")

    def _frames(self) -> Iterator[Frame]:
        pacer = Pacer()
        for index, av_frame in enumerate(self._decode(self._container)):
            image = self._converter.convert(av_frame)
            if self._counter:
                draw_counter(image, index)
            pacer.wait(av_frame.time)
            yield Frame(image, time.monotonic(), index)


class FileSource(_PyAVSource):
    """A video file played at its own frame rate (from its timestamps), optionally looping.

    Without ``loop`` :meth:`frames` ends after the last frame; with it the file is reopened
    at the end and timestamps continue, so pacing stays smooth across the seam.

    The file's first audio stream, if any (``carries_audio``), is demuxed with the video and
    each decoded chunk goes to the audio listener as soon as it is decoded, stamped with the
    time its media time is due on the video's :class:`Pacer`: the frame with media time ``t``
    is yielded at the pacer's ``anchor + t``, so a chunk at media time ``ta`` gets
    ``anchor + ta``. This is exact where a :class:`~broadcast_filter.media.audio.MediaClock`
    fed with the yielded frames would only approach it, and it follows the pacer when a stall
    re-anchors it. An audio stream that fails to decode is logged once and dropped; the
    video plays on.
    """

    kind: ClassVar[str] = "file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        width: int,
        height: int,
        fit: FitPolicy = "crop",
        loop: bool = False,
    ) -> None:
        super().__init__(width=width, height=height, fit=fit)
        self.path, self.loop = Path(path), loop
        self.spec = InputSpec(None, str(self.path))
        if not self.path.is_file():
            raise MediaError(f"video file not found: {self.path}")
        self._container = self._open()
        audio = self._container.streams.audio
        self.carries_audio = bool(audio)
        self.audio_state = describe(audio[0].codec_context if audio else None)
        self.audio_format = stream_format(audio[0].codec_context if audio else None)
        self._aac_config = stream_config(audio[0].codec_context) if audio else None
        self._audio_broken = False
        self._audio_converter = AudioConverter()
        self._audio_next: float | None = None  # media time of the next decoded audio sample

    def _open(self) -> av.container.InputContainer:
        container = _open_input(self.spec, f"video file {self.path}", "Is it a video file?")
        if not container.streams.video:
            container.close()
            raise MediaError(f"{self.path} has no video stream")
        return container

    def _frames(self) -> Iterator[Frame]:
        pacer, index, offset = Pacer(), 0, 0.0
        # media time of the file's first video frame: the pacing origin (the same file on
        # every loop); audio decoded before it is known waits in `pending` (a few packets)
        first: float | None = None
        pending: list[tuple[float, np.ndarray | CodedAudio, int]] = []
        while True:
            video = self._container.streams.video[0]
            video.thread_type = "AUTO"
            audio = self._container.streams.audio[0] if self.carries_audio else None
            step = float(1 / video.average_rate) if video.average_rate else 1 / 30
            last = None
            streams = [video] if audio is None or self._audio_broken else [video, audio]
            try:
                for packet in self._container.demux(*streams):
                    if self._stop:
                        return
                    if packet.stream.type == "audio":
                        pending += self._decode_audio(packet)
                        if first is None and pending and pending[-1][0] - pending[0][0] > LEAD_S:
                            first = pending[0][0]  # no video frame yet: pace from the audio
                        if first is not None:
                            self._emit_pending(pending, pacer, offset - first)
                        continue
                    for av_frame in packet.decode():
                        t = av_frame.time if av_frame.time is not None else index * step
                        first = t if first is None else first
                        last = t
                        image = self._converter.convert(av_frame)
                        pacer.wait(offset + t - first)
                        self._emit_pending(pending, pacer, offset - first)
                        yield Frame(image, time.monotonic(), index)
                        index += 1
            except av.error.FFmpegError as e:
                raise MediaError(f"cannot decode {self.path}: {e}") from e
            if self._stop or not self.loop:
                return
            if last is None or first is None:
                raise MediaError(f"{self.path} has no decodable video frames; cannot loop it")
            offset += last - first + step
            self._container.close()
            self._container = self._open()

    def _decode_audio(self, packet: av.Packet) -> list[tuple[float, np.ndarray | CodedAudio, int]]:
        """``(media time, samples, rate)`` for each chunk decoded from ``packet``, and its
        AAC-LC frame as it is in the file (for sinks that copy it); none once the audio
        stream failed to decode (said once, in the log and :attr:`audio_state`)."""
        if self._audio_broken:
            return []
        chunks: list[tuple[float, np.ndarray | CodedAudio, int]] = []
        try:
            frames = packet.decode()
            coded = coded_frame(bytes(packet), self._aac_config, frames[0]) if frames else None
            if coded is not None and packet.pts is not None:
                chunks.append((float(packet.pts * packet.time_base), coded, coded.rate))
            for frame in frames:
                samples = self._audio_converter.convert(frame)
                rate = self._audio_converter.rate
                if frame.time is not None:
                    self._audio_next = frame.time
                if len(samples) and self._audio_next is not None:
                    chunks.append((self._audio_next, samples, rate))
                    self._audio_next += len(samples) / rate
        except (av.error.FFmpegError, ValueError) as e:
            self._audio_broken = True
            self.audio_state = f"{self.audio_state}, undecodable"
            log.warning(
                "%s: cannot decode its audio (%s); playing the video without it", self.path, e
            )
        return chunks

    def _emit_pending(
        self, pending: list[tuple[float, np.ndarray, int]], pacer: Pacer, shift: float
    ) -> None:
        """Hand the decoded chunks to the listener, each stamped with the time its media time
        (plus ``shift``: loop offset less the pacing origin) is due on the pacer."""
        for t, samples, rate in pending:
            if isinstance(samples, CodedAudio):
                self._emit_coded(dataclasses.replace(samples, captured_at=pacer.due(shift + t)))
            else:
                self._emit_audio(AudioChunk(samples, pacer.due(shift + t), rate))
        pending.clear()


class _LiveSource(_PyAVSource):
    """A capture input that delivers at its own pace and never ends on its own; with
    ``audio`` (``FORMAT:DEVICE``, :mod:`~broadcast_filter.media.audio_input`) its sound
    comes from that audio device."""

    what: ClassVar[str]
    hint: ClassVar[str]

    def __init__(
        self, spec: InputSpec, *, width: int, height: int, fit: FitPolicy, audio: str | None
    ) -> None:
        super().__init__(width=width, height=height, fit=fit)
        self.spec = spec
        self._audio = AudioInput(audio, self._emit_audio) if audio else None
        self.carries_audio = self._audio is not None  # type: ignore[misc]
        self.audio_format = self._audio.format if self._audio is not None else None
        try:
            self._container = _open_input(spec, f"{self.what} {spec.url!r}", self.hint)
        except BaseException:
            if self._audio is not None:
                self._audio.close()
            raise

    @property  # type: ignore[override]
    def audio_state(self) -> str:
        return self._audio.state if self._audio is not None else "none"

    def close(self) -> None:
        if self._audio is not None:
            self._audio.close()
        super().close()

    def _frames(self) -> Iterator[Frame]:
        if self._audio is not None:
            self._audio.start()
        index = 0
        try:
            for av_frame in self._decode(self._container):
                yield Frame(self._converter.convert(av_frame), time.monotonic(), index)
                index += 1
        except av.error.FFmpegError as e:
            raise SourceLost(f"{self.what} {self.spec.url!r} stopped delivering: {e}") from e
        if not self._stop:
            raise SourceLost(f"{self.what} {self.spec.url!r} ended (unplugged or closed?)")


def capture_input(
    device: str,
    *,
    system: str | None = None,
    size: tuple[int, int] | None = None,
    fps: float | None = None,
    pixel_format: str | None = None,
) -> InputSpec:
    """Build the capture input for a camera on ``system`` (default: this OS).

    ``device`` is ``/dev/videoN`` (Linux, v4l2), ``video=NAME`` or ``NAME`` (Windows, dshow),
    or an index or name (macOS, avfoundation). ``pixel_format`` may be a raw format
    (``yuyv422``, ``nv12``) or a compressed one (``mjpeg``, ``h264``).
    """
    system = system or platform.system()
    options = dict(LIVE_PROBE)
    if size:
        options["video_size"] = f"{size[0]}x{size[1]}"
    if fps:
        options["framerate"] = str(frame_rate(fps))
    compressed = pixel_format in ("mjpeg", "h264")
    if system == "Linux":
        if pixel_format:
            options["input_format"] = pixel_format
        return InputSpec("v4l2", device, options)
    if system == "Windows":
        if pixel_format:
            options["vcodec" if compressed else "pixel_format"] = pixel_format
        return InputSpec("dshow", device if "=" in device else f"video={device}", options)
    if system == "Darwin":
        if pixel_format:
            options["pixel_format"] = pixel_format
        return InputSpec("avfoundation", device if ":" in device else f"{device}:none", options)
    raise MediaError(f"no camera capture on {system}; use Linux, Windows or macOS")


def default_camera(index: int = 0, *, system: str | None = None) -> str:
    """The camera ``device:INDEX`` means on ``system``: ``/dev/videoN`` or an avfoundation index.

    On Windows, dshow opens cameras by name, so the name is looked up in :func:`list_cameras`.
    """
    system = system or platform.system()
    if system == "Linux":
        return f"/dev/video{index}"
    if system == "Darwin":
        return str(index)
    if system == "Windows":
        cameras = list_cameras()
        if index >= len(cameras):
            raise MediaError(
                f"no camera number {index}: found {len(cameras)}. "
                "Plug one in, or name it: dshow:video=NAME"
            )
        return cameras[index].url.partition(":")[2]
    raise MediaError(f"no camera capture on {system}; use Linux, Windows or macOS")


class CaptureSource(_LiveSource):
    """A camera: v4l2 (Linux), dshow (Windows), avfoundation (macOS); see :func:`capture_input`."""

    kind: ClassVar[str] = "device"
    what = "camera"
    hint = (
        "Check that the camera is plugged in and not used by another program, and that it "
        "supports the size, fps and pixel format asked for "
        "(`broadcast-filter devices` lists cameras)."
    )

    def __init__(
        self,
        device: str,
        *,
        width: int,
        height: int,
        fit: FitPolicy = "crop",
        size: tuple[int, int] | None = None,
        fps: float | None = None,
        pixel_format: str | None = None,
        system: str | None = None,
        audio: str | None = None,
    ) -> None:
        spec = capture_input(device, system=system, size=size, fps=fps, pixel_format=pixel_format)
        super().__init__(spec, width=width, height=height, fit=fit, audio=audio)


def screen_input(
    display: str | None = None,
    *,
    system: str | None = None,
    fps: float = 30,
    size: tuple[int, int] | None = None,
    draw_mouse: bool = False,
) -> InputSpec:
    """Build the screen capture input: x11grab (Linux), gdigrab (Windows), avfoundation (macOS).

    ``display`` is an X11 display and offset (``:0.0+100,200``, default ``$DISPLAY``), a gdigrab
    target (``desktop``, ``title=Window``) or an avfoundation screen (``Capture screen 0``).
    ``size`` captures a region of that size instead of the whole screen.
    """
    system = system or platform.system()
    options = {**LIVE_PROBE, "framerate": str(frame_rate(fps)), "draw_mouse": str(int(draw_mouse))}
    if size:
        options["video_size"] = f"{size[0]}x{size[1]}"
    if system == "Linux":
        display = display or os.environ.get("DISPLAY")
        if not display:
            raise MediaError(
                "no X display to capture: set DISPLAY or give one, e.g. screen::0.0 "
                "(Wayland sessions need XWayland; x11grab reads X11 only)"
            )
        return InputSpec("x11grab", display, options)
    if system == "Windows":
        return InputSpec("gdigrab", display or "desktop", options)
    if system == "Darwin":
        options["capture_cursor"] = options.pop("draw_mouse")
        return InputSpec("avfoundation", f"{display or 'Capture screen 0'}:none", options)
    raise MediaError(f"no screen capture on {system}; use Linux, Windows or macOS")


class ScreenSource(_LiveSource):
    """The screen or a region of it, captured at ``capture_fps`` (see :func:`screen_input`)."""

    kind: ClassVar[str] = "screen"
    what = "screen"
    hint = "Check that the display exists and this user may read it (X11: DISPLAY, xhost)."

    def __init__(
        self,
        display: str | None = None,
        *,
        width: int,
        height: int,
        fps: float,
        fit: FitPolicy = "letterbox",
        size: tuple[int, int] | None = None,
        draw_mouse: bool = False,
        system: str | None = None,
        audio: str | None = None,
    ) -> None:
        spec = screen_input(display, system=system, fps=fps, size=size, draw_mouse=draw_mouse)
        super().__init__(spec, width=width, height=height, fit=fit, audio=audio)


def list_cameras() -> list[Device]:
    """Cameras on this machine: ``/dev/video*`` on Linux, dshow/avfoundation listings elsewhere."""
    system = platform.system()
    if system == "Linux":
        devices = []
        for path in sorted(glob.glob("/dev/video*"), key=lambda p: int(p[10:] or 0)):
            name_file = Path("/sys/class/video4linux", Path(path).name, "name")
            name = name_file.read_text().strip() if name_file.is_file() else path
            devices.append(Device("camera", f"v4l2:{path}", name))
        return devices
    if system == "Windows":
        names = _ffmpeg_device_list("dshow", "dummy")
        return [Device("camera", f"dshow:video={n}", n) for n in names]
    if system == "Darwin":
        names = _ffmpeg_device_list("avfoundation", "")
        return [
            Device("camera", f"avfoundation:{i}", n)
            for i, n in enumerate(names)
            if not n.startswith("Capture screen")
        ]
    return []


def list_screens() -> list[Device]:
    """Screens to capture: running X displays on Linux, the desktop on Windows, screens on macOS."""
    system = platform.system()
    if system == "Linux":
        sockets = glob.glob("/tmp/.X11-unix/X*")
        displays = sorted({f":{Path(s).name[1:]}" for s in sockets} | _env_display())
        return [Device("screen", f"x11grab:{d}", f"X11 display {d}") for d in displays]
    if system == "Windows":
        return [Device("screen", "gdigrab:desktop", "desktop")]
    if system == "Darwin":
        names = _ffmpeg_device_list("avfoundation", "")
        return [Device("screen", f"screen:{n}", n) for n in names if n.startswith("Capture screen")]
    return []


def _env_display() -> set[str]:
    return {os.environ["DISPLAY"]} if os.environ.get("DISPLAY") else set()


def _ffmpeg_device_list(fmt: str, url: str) -> list[str]:
    """Video device names FFmpeg logs for ``list_devices=true`` (dshow, avfoundation)."""
    if fmt not in _demuxers():
        return []
    level = av.logging.get_level()
    av.logging.set_level(av.logging.INFO)
    try:
        # listing always "fails" to open: the names are in the log
        with av.logging.Capture() as logs, contextlib.suppress(av.error.FFmpegError, OSError):
            av.open(url, format=fmt, options={"list_devices": "true"}).close()
    finally:
        av.logging.set_level(level)
    return parse_device_list([message for _, _, message in logs])


def parse_device_list(messages: list[str]) -> list[str]:
    """Video device names from FFmpeg's ``list_devices`` log messages.

    dshow logs ``"Name" (video)``; avfoundation logs ``[N] Name`` under a
    "video devices:" header, then its audio devices under an "audio devices:" header.
    """
    names, video = [], True
    for message in messages:
        line = message.strip()
        if line.endswith("devices:"):
            video = "video" in line
        elif line.startswith('"') and line.endswith("(video)"):
            names.append(line.split('"')[1])
        elif video and line.startswith("[") and "]" in line:
            names.append(line.split("]", 1)[1].strip())
    return names
