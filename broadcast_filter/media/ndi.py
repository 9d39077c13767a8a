"""NDI in and out through ndi-python (the ``[ndi]`` extra), registered as ``ndi`` when importable.

* Source ``ndi:NAME`` — receive the NDI source called NAME: either the full NDI name
  ``MACHINE (stream)`` or just ``stream``. Discovery waits up to ``discovery_timeout`` seconds
  and the error lists every source it saw. Bandwidth is always "highest" (full resolution).
* Sink ``ndi:NAME`` — publish a named NDI source at the sink's size, with its frame rate in
  the frame metadata; frames are paced by the daemon (``clock_video`` off).

Discovery uses mDNS, or unicast when ``extra_ips`` (comma-separated) is given or the NDI
config file in ``NDI_CONFIG_DIR`` lists ``"ips"``. The ndi-python calls release the GIL
while they wait, so NDI runs in threads of the daemon (no extra process). NDI® is a
registered trademark of Vizrt NDI AB.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from types import ModuleType

import numpy as np

from broadcast_filter.media.base import (
    Frame,
    MediaError,
    Sink,
    Source,
    SourceLost,
    audio_track,
    register_sink,
    register_source,
)
from broadcast_filter.media.rate import frame_rate
from broadcast_filter.media.sources import Device
from broadcast_filter.slot import LatestSlot

MISSING_MESSAGE = (
    "NDI needs the ndi-python package: pip install 'broadcast-filter[ndi]' "
    "(it bundles the NDI runtime; see the NDI SDK license)"
)

_lib: ModuleType | None = None
_lib_lock = threading.Lock()


def ndi_lib() -> ModuleType:
    """Import and initialise ndi-python once per process, or raise a MediaError saying how."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                import NDIlib
            except ImportError as exc:
                raise MediaError(MISSING_MESSAGE) from exc
            if not NDIlib.initialize():
                raise MediaError("the NDI runtime failed to start (is this CPU supported?)")
            _lib = NDIlib
    return _lib


def is_installed() -> bool:
    """Whether ndi-python can be imported (without starting the NDI runtime)."""
    return importlib.util.find_spec("NDIlib") is not None


def _name(url: str) -> str:
    name = url.removeprefix("ndi:").removeprefix("//")
    if not name:
        raise MediaError("an NDI URL needs a source name: ndi:NAME or ndi:MACHINE (NAME)")
    return name


def _matches(full_name: str, wanted: str) -> bool:
    return full_name == wanted or full_name.endswith(f"({wanted})")


class NdiSource(Source):
    """Receive an NDI source by name; ``frames()`` raises SourceLost after ``lost_after``
    seconds without video, and picks the sender up again when called once more
    (NDI reconnects by name by itself, ~5 s after a sender restarts).

    What it promises: every video frame the NDI receiver hands over is yielded, in order.
    A consumer slower than the sender makes the NDI runtime's receive queue drop frames;
    the runtime counts them (``recv_get_performance``) and so does :attr:`dropped`, which
    ``state`` (the daemon's status field) shows."""

    kind = "ndi"

    def __init__(
        self,
        url: str,
        *,
        discovery_timeout: float = 5.0,
        extra_ips: str | None = None,
        lost_after: float = 2.0,
    ) -> None:
        self.name = _name(url)
        self.discovery_timeout = discovery_timeout
        self.extra_ips = extra_ips
        self.lost_after = lost_after
        self.fps: Fraction | None = None
        self._state = "not started"
        self._receiver = None
        self._closed = threading.Event()
        self._index = 0
        self._dropped_before = 0  # by receivers already destroyed

    @property
    def dropped(self) -> int:
        """Video frames the NDI runtime dropped before we captured them."""
        receiver = self._receiver
        if receiver is None:
            return self._dropped_before
        _, dropped = ndi_lib().recv_get_performance(receiver)
        return self._dropped_before + int(dropped.video_frames)

    @property
    def state(self) -> str:
        dropped = self.dropped
        return f"{self._state}, {dropped} dropped" if dropped else self._state

    def _find(self):
        ndi = ndi_lib()
        self._state = f"looking for NDI source {self.name!r}"
        settings = ndi.FindCreate()
        if self.extra_ips:
            settings.extra_ips = self.extra_ips
        finder = ndi.find_create_v2(settings)
        try:
            deadline = time.monotonic() + self.discovery_timeout
            seen: list[str] = []
            while not self._closed.is_set():
                sources = ndi.find_get_current_sources(finder)
                seen = [s.ndi_name for s in sources]
                for source in sources:
                    if _matches(source.ndi_name, self.name):
                        return source
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ndi.find_wait_for_sources(finder, int(min(left, 0.5) * 1000))
            found = ", ".join(repr(s) for s in seen) or "none"
            raise MediaError(
                f"NDI source {self.name!r} not found within {self.discovery_timeout:g}s; "
                f"sources seen: {found}. Check the sender is running and reachable; without "
                "mDNS set extra_ips or an NDI config (NDI_CONFIG_DIR) listing its IP."
            )
        finally:
            ndi.find_destroy(finder)

    def _connect(self) -> None:
        ndi = ndi_lib()
        source = self._find()
        settings = ndi.RecvCreateV3()
        settings.source_to_connect_to = source
        settings.color_format = ndi.RECV_COLOR_FORMAT_RGBX_RGBA
        settings.bandwidth = ndi.RECV_BANDWIDTH_HIGHEST
        settings.allow_video_fields = False
        self._receiver = ndi.recv_create_v3(settings)
        if self._receiver is None:
            raise MediaError(f"could not create an NDI receiver for {self.name!r}")
        self._state = f"connecting to {source.ndi_name!r}"

    def frames(self) -> Iterator[Frame]:
        ndi = ndi_lib()
        if self._receiver is None:
            self._connect()
        live_since: float | None = None
        last_video = time.monotonic()
        while not self._closed.is_set():
            kind, video, _, _ = ndi.recv_capture_v3(self._receiver, 200, True, False, False)
            now = time.monotonic()
            if kind != ndi.FRAME_TYPE_VIDEO:
                if live_since is not None and now - last_video > self.lost_after:
                    self._state = f"lost (no video for {self.lost_after:g}s), waiting for sender"
                    raise SourceLost(f"NDI {self.name!r}: {self._state}")
                continue
            try:
                image = np.ascontiguousarray(video.data[:, :, :3])
                self.fps = Fraction(video.frame_rate_N, max(1, video.frame_rate_D))
            finally:
                ndi.recv_free_video_v2(self._receiver, video)
            if live_since is None:
                live_since = now
                self._state = "live"
            last_video = now
            yield Frame(image, now, self._index)
            self._index += 1

    def close(self) -> None:
        self._closed.set()
        if self._receiver is not None:
            self._dropped_before = self.dropped
            ndi_lib().recv_destroy(self._receiver)
            self._receiver = None
        self._state = "closed"


class NdiSink(Sink):
    """Publish frames as the NDI source ``NAME``; a worker thread sends the newest frame.

    What it promises: ``send()`` never waits for the network; a frame that is replaced
    before the worker sent it is dropped and counted in :attr:`dropped` (shown in
    ``state``). The newest frame is always sent, also the last one before ``close()``."""

    kind = "ndi"

    def __init__(
        self, url: str, *, width: int, height: int, fps: float, audio: str = "off"
    ) -> None:
        super().__init__(width=width, height=height, fps=fps)
        ndi = ndi_lib()
        self.name = self.label = _name(url)
        audio_track(audio, self.label)  # NDI audio is always PCM: any mode but "off" is on
        settings = ndi.SendCreate()
        settings.ndi_name = self.name
        settings.clock_video = False  # the daemon paces output itself
        settings.clock_audio = False
        self._sender = ndi.send_create(settings)
        if self._sender is None:
            raise MediaError(f"could not create the NDI sender {self.name!r}")
        rate = frame_rate(fps)
        self._frame = ndi.VideoFrameV2()
        self._frame.FourCC = ndi.FOURCC_VIDEO_TYPE_RGBX
        self._frame.frame_rate_N, self._frame.frame_rate_D = rate.numerator, rate.denominator
        self._frame.picture_aspect_ratio = width / height
        self._frame.frame_format_type = ndi.FRAME_FORMAT_TYPE_PROGRESSIVE
        self._rgbx = np.full((height, width, 4), 255, np.uint8)
        # drain: the frame sent last before close() still goes out
        self._slot: LatestSlot[np.ndarray] = LatestSlot(drain=True)
        self._thread = threading.Thread(target=self._run, name=f"ndi {self.name}", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self._slot.dropped

    @property
    def state(self) -> str:
        """How many receivers watch this source."""
        count = ndi_lib().send_get_no_connections(self._sender, 0)
        text = f"live, {count} receiver{'s' if count != 1 else ''}"
        return f"{text}, {self.dropped} dropped" if self.dropped else text

    def send(self, image: np.ndarray) -> None:
        self.check(image)
        self._slot.put(image.copy())

    def _run(self) -> None:
        ndi = ndi_lib()
        while (image := self._slot.take()) is not None:
            self._rgbx[:, :, :3] = image
            self._frame.data = self._rgbx
            ndi.send_send_video_v2(self._sender, self._frame)

    def close(self) -> None:
        self._slot.close()
        self._thread.join(timeout=5)
        ndi_lib().send_destroy(self._sender)


def list_ndi_sources(timeout: float = 1.5, extra_ips: str | None = None) -> list[Device]:
    """NDI sources found within ``timeout`` seconds, for the ``devices`` command. Without
    ndi-python, one unavailable entry that says how to install it. Discovery is mDNS, or
    unicast to ``extra_ips`` / the IPs in the NDI config file under ``NDI_CONFIG_DIR``."""
    if not is_installed():
        return [Device("ndi", "ndi:NAME", "NDI", available=False, note=MISSING_MESSAGE)]
    try:
        ndi = ndi_lib()
    except MediaError as exc:
        return [Device("ndi", "ndi:NAME", "NDI", available=False, note=str(exc))]
    settings = ndi.FindCreate()
    if extra_ips:
        settings.extra_ips = extra_ips
    finder = ndi.find_create_v2(settings)
    try:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ndi.find_wait_for_sources(finder, int(min(left, 0.5) * 1000))
        names = sorted({s.ndi_name for s in ndi.find_get_current_sources(finder)})
    finally:
        ndi.find_destroy(finder)
    return [Device("ndi", f"ndi:{name}", name, note=_address(name)) for name in names]


def _address(full_name: str) -> str:
    """``MACHINE (stream)`` -> the short form ``ndi:stream`` also accepted, as a note."""
    stream = full_name.rpartition("(")[2].removesuffix(")")
    return f"also ndi:{stream}" if "(" in full_name and stream else ""


if is_installed():
    register_source(NdiSource.kind, NdiSource)
    register_sink(NdiSink.kind, NdiSink)
