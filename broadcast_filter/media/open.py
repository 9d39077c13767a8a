"""Open a source or sink from a URL, and list the devices this machine has.

Local forms are registered here under their scheme in :data:`base.SOURCES` / :data:`base.SINKS`;
network transports (rtmp, udp, srt, ndi) register themselves in
``broadcast_filter.media.network`` and ``broadcast_filter.media.ndi``, imported here
(NDI registers only when ndi-python is installed).
Sink factories are called as ``factory(url, width=, height=, fps=, **options)``. Local source
factories also get ``fit=`` and convert frames themselves; other source factories are called as
``factory(url, **options)`` and their native-size frames are fitted by
:class:`~broadcast_filter.media.sources.FittedSource`.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from . import ndi, network  # noqa: F401 - importing them registers their kinds
from .audio import AUDIO_BITRATE, CHANNELS, RATE
from .base import (
    SINKS,
    SOURCES,
    MediaError,
    Sink,
    Source,
    SourceFactory,
    register_sink,
    register_source,
)
from .convert import FitPolicy
from .sinks import FileSink, NullSink, VirtualCameraSink, list_virtual_cameras
from .sources import (
    CaptureSource,
    Device,
    FileSource,
    FittedSource,
    ScreenSource,
    TestPatternSource,
    default_camera,
    list_cameras,
    list_screens,
)

SOURCE_FORMS = """\
  (none) | testsrc | testsrc:WxH@FPS        test pattern (default)
  PATH | file:PATH[?loop=1]                 video file
  /dev/videoN | v4l2:/dev/videoN            camera (Linux)
  dshow:video=NAME                          camera (Windows)
  avfoundation:INDEX                        camera (macOS)
  device:N                                  camera number N on this OS
      cameras take ?size=WxH&fps=N&pixel_format=mjpeg&audio=FORMAT:DEVICE (alsa:default,
      dshow:audio=NAME, avfoundation::0: the sound beside the picture; screens take it too)
  screen | screen:DISPLAY | x11grab::0.0+X,Y | gdigrab:desktop    screen [?size=WxH&draw_mouse=1]
  rtmp://HOST:PORT/APP/KEY?listen=1         be the RTMP server a publisher (OBS) pushes to
  rtmp://HOST:PORT/APP/KEY                  pull from an RTMP server (nginx-rtmp, ...)
  udp://HOST:PORT                           MPEG-TS over UDP, received on HOST:PORT
  srt://:PORT?mode=listener | srt://HOST:PORT?mode=caller    SRT (needs srt-live-transmit)
  ndi:NAME | ndi:MACHINE (NAME)             NDI source (needs the [ndi] extra)"""

SINK_FORMS = """\
  vcam | vcam:DEVICE | vcam?backend=NAME    virtual camera (pyvirtualcam)
  null                                      discard frames (benchmarks)
  PATH.mp4 | PATH.mkv | file:PATH           H.264 recording [?preset=veryfast&crf=23&gop=N]
                                            with AAC sound [&audio=aac|copy|off&audio_bitrate=N]
  rtmp://HOST:PORT/APP/KEY                  publish H.264/FLV to an RTMP server
  udp://HOST:PORT                           H.264 in MPEG-TS over UDP (an OBS Media Source)
  srt://HOST:PORT?mode=caller | srt://:PORT?mode=listener    SRT (needs srt-live-transmit)
  ndi:NAME                                  publish an NDI source (needs the [ndi] extra)"""

#: sources registered below, which take the engine's size and fit and convert frames themselves
_LOCAL_SOURCES = frozenset(
    ["testsrc", "file", "device", "v4l2", "dshow", "avfoundation", "screen", "x11grab", "gdigrab"]
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)(?=[:?]|$)")


def open_source(
    url: str | None,
    *,
    width: int,
    height: int,
    fps: float,
    fit: FitPolicy = "crop",
    **options: object,
) -> Source:
    """Open the source ``url`` names (:data:`SOURCE_FORMS`), giving RGB at ``width x height``."""
    url = url or "testsrc"
    scheme = _scheme(url, SOURCES, SOURCE_FORMS, "source")
    if scheme in _LOCAL_SOURCES:
        return SOURCES[scheme](url, width=width, height=height, fps=fps, fit=fit, **options)
    return FittedSource(SOURCES[scheme](url, **options), width=width, height=height, fit=fit)


def open_sink(url: str, *, width: int, height: int, fps: float, **options: object) -> Sink:
    """Open the sink ``url`` names (see :data:`SINK_FORMS`) for ``width x height`` at ``fps``."""
    scheme = _scheme(url, SINKS, SINK_FORMS, "sink")
    return SINKS[scheme](url, width=width, height=height, fps=fps, **options)


def list_devices(ndi_timeout: float = 1.5) -> list[Device]:
    """Cameras, screens, virtual cameras and NDI sources (discovered for ``ndi_timeout``
    seconds; 0 skips discovery), for the ``devices`` command."""
    devices = list_cameras() + list_screens() + list_virtual_cameras()
    if ndi_timeout > 0:
        devices += ndi.list_ndi_sources(ndi_timeout)
    return devices


def _scheme(url: str, registry: dict, forms: str, what: str) -> str:
    """The registry key for ``url``; bare paths are files, ``/dev/video*`` is v4l2."""
    if url.startswith("/dev/video"):
        return "v4l2"
    match = _SCHEME.match(url)
    if match and match.group(1).lower() in registry:
        return match.group(1).lower()
    if match and url[match.end() :].startswith(":"):
        raise MediaError(f"unknown {what} {url!r}; accepted forms:\n{forms}")
    return "file"


def _split(url: str) -> tuple[str, dict[str, str]]:
    """``scheme:rest?k=v`` -> (rest, {k: v}); a URL without a known scheme is all rest."""
    match = _SCHEME.match(url)
    if match and match.group(1).lower() in SOURCES | SINKS:
        url = url[match.end() :].removeprefix(":")
    rest, _, query = url.partition("?")
    return rest, dict(parse_qsl(query))


def _size(value: object, what: str) -> tuple[int, int] | None:
    if value is None or isinstance(value, tuple):
        return value
    m = re.fullmatch(r"(\d+)x(\d+)", str(value))
    if not m:
        raise MediaError(f"{what} must look like 1280x720, got {value!r}")
    return int(m.group(1)), int(m.group(2))


def _float(value: object, what: str) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        raise MediaError(f"{what} must be a number, got {value!r}") from None


def _flag(value: object) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def _testsrc(url: str, *, width: int, height: int, fps: float, fit: FitPolicy, **options) -> Source:
    rest, query = _split(url)
    m = re.fullmatch(r"(?:(\d+x\d+))?(?:@([\d.]+))?", rest)
    if not m:
        raise MediaError(f"test pattern must look like testsrc:1280x720@30, got {url!r}")
    opts = {**query, **options}
    return TestPatternSource(
        width=width,
        height=height,
        fps=fps,
        fit=fit,
        size=_size(m.group(1), "test pattern size"),
        rate=_float(m.group(2), "test pattern fps"),
        counter=_flag(opts.get("counter", True)),
    )


def _file(url: str, *, width: int, height: int, fps: float, fit: FitPolicy, **options) -> Source:
    path, query = _split(url)
    opts = {**query, **options}
    try:
        return FileSource(path, width=width, height=height, fit=fit, loop=_flag(opts.get("loop")))
    except MediaError as e:
        if path.startswith(("/", ".", "~")) or "." in path:
            raise
        raise MediaError(f"{e}; if it is not a file, accepted forms are:\n{SOURCE_FORMS}") from e


def _capture(system: str | None, *, numbered: bool = False) -> SourceFactory:
    def factory(
        url: str, *, width: int, height: int, fps: float, fit: FitPolicy, **options
    ) -> Source:
        device, query = _split(url)
        opts = {**query, **options}
        if numbered:
            if not re.fullmatch(r"\d*", device):
                raise MediaError(f"device:N takes a camera number, got {url!r}")
            device = default_camera(int(device or 0))
        return CaptureSource(
            device,
            width=width,
            height=height,
            fit=fit,
            size=_size(opts.get("size"), "camera size"),
            fps=_float(opts.get("fps"), "camera fps"),
            pixel_format=opts.get("pixel_format"),
            system=system,
            audio=opts.get("audio"),
        )

    return factory


def _screen(system: str | None) -> SourceFactory:
    def factory(
        url: str, *, width: int, height: int, fps: float, fit: FitPolicy, **options
    ) -> Source:
        display, query = _split(url)
        opts = {**query, **options}
        return ScreenSource(
            display or None,
            width=width,
            height=height,
            fps=_float(opts.get("fps"), "screen fps") or fps,
            fit=fit,
            size=_size(opts.get("size"), "screen region size"),
            draw_mouse=_flag(opts.get("draw_mouse")),
            system=system,
            audio=opts.get("audio"),
        )

    return factory


def _vcam(url: str, *, width: int, height: int, fps: float, **options) -> Sink:
    device, query = _split(url)
    opts = {**query, **options}
    return VirtualCameraSink(
        width=width, height=height, fps=fps, device=device or None, backend=opts.get("backend")
    )


def _null(url: str, *, width: int, height: int, fps: float, **options) -> Sink:
    return NullSink(width=width, height=height, fps=fps)


def _file_sink(url: str, *, width: int, height: int, fps: float, **options) -> Sink:
    path, query = _split(url)
    opts = {**query, **options}
    if not path.lower().endswith(tuple(FileSink.CONTAINERS)):
        raise MediaError(f"unknown sink {url!r}; accepted forms:\n{SINK_FORMS}")
    return FileSink(
        path,
        width=width,
        height=height,
        fps=fps,
        codec=str(opts.get("codec", "libx264")),
        preset=str(opts.get("preset", "veryfast")),
        crf=int(opts.get("crf", 23)),
        gop=int(opts["gop"]) if "gop" in opts else None,
        audio=str(opts.get("audio", "off")),
        audio_bitrate=int(opts.get("audio_bitrate", AUDIO_BITRATE)),
        audio_format=opts.get("audio_format", (RATE, CHANNELS)),
    )


register_source("testsrc", _testsrc)
register_source("file", _file)
register_source("device", _capture(None, numbered=True))
register_source("v4l2", _capture("Linux"))
register_source("dshow", _capture("Windows"))
register_source("avfoundation", _capture("Darwin"))
register_source("screen", _screen(None))
register_source("x11grab", _screen("Linux"))
register_source("gdigrab", _screen("Windows"))
register_sink("vcam", _vcam)
register_sink("null", _null)
register_sink("file", _file_sink)
