"""NDI in and out through ndi-python (the ``[ndi]`` extra), registered as ``ndi`` when importable.

* Source ``ndi:NAME`` — receive the NDI source called NAME: either the full NDI name
  ``MACHINE (stream)`` or just ``stream``. Discovery waits up to ``discovery_timeout`` seconds
  and the error lists every source it saw. Bandwidth is always "highest" (full resolution).
* Sink ``ndi:NAME`` — publish a named NDI source at the sink's size, with its frame rate in
  the frame metadata; frames are paced by the daemon (``clock_video`` off).

Sound: the source captures the sender's audio (planar float, any rate, 1 to 8 channels) and hands it
on in that format, stamped on the video's clock; the sink sends the daemon's delayed audio in the
format it comes in (the source's) in the same NDI sender. Both ends use NDI *timecodes* (100 ns
units) as the shared media time of audio and video: the sink writes the on-air time of every video
frame and audio chunk (UTC, from ``time.monotonic()``) into its timecode, and the source maps the
sender's timecodes onto ``time.monotonic()`` with a
:class:`~broadcast_filter.media.audio.MediaClock`. A sender whose video timecodes do not advance
(e.g. all 0) is timed by NDI's send timestamps instead, which the SDK stamps when a frame is
submitted (audio sent in blocks then arrives stamped a little late).

Discovery uses mDNS, or unicast when ``extra_ips`` (comma-separated) is given or the NDI
config file in ``NDI_CONFIG_DIR`` lists ``"ips"`` (asked again with fresh finders, since a
unicast query reaches only one NDI process of a host: :func:`discover`). The ndi-python
calls release the GIL while they wait, so NDI runs in threads of the daemon (no extra
process). NDI® is a registered trademark of Vizrt NDI AB.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from types import ModuleType

import numpy as np

from broadcast_filter.media.audio import (
    LAYOUTS,
    RATE,
    AudioChunk,
    CodedAudio,
    MediaClock,
    format_name,
)
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

log = logging.getLogger(__name__)

#: NDI timecodes and timestamps count 100 ns ticks
TICKS_PER_S = 10_000_000
#: NDI's "no value" for timecodes and timestamps (``NDIlib_recv_timestamp_undefined``)
UNDEFINED = (1 << 63) - 1
#: audio queued in a sink for its sender thread; older audio is dropped (and counted)
SINK_AUDIO_QUEUE_S = 2.0

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


class NdiTimes:
    """The media time of an NDI stream's frames, mapped onto ``time.monotonic()``.

    The basis is the sender's timecode while its video timecodes advance (that is how a
    sender says which audio goes with which picture). A sender that leaves them at 0, repeats
    them or jumps back, or whose audio timecodes are not near its video's, is timed by the
    SDK's send timestamps (UTC when submitted); without those, by arrival. Video feeds a
    :class:`MediaClock` for either basis, so a switch keeps the video's offset. The switch
    is logged once and lasts until :meth:`reset` (a new connection)."""

    #: an audio time this far from its arrival is not on the video's basis
    MAX_AUDIO_SKEW_S = 2.0

    def __init__(self) -> None:
        self.basis = "timecode"
        self._clocks = {"timecode": MediaClock(), "send timestamp": MediaClock()}
        self._last_timecode: int | None = None

    def reset(self) -> None:
        self.basis = "timecode"
        for clock in self._clocks.values():
            clock.reset()
        self._last_timecode = None

    def _fall_back(self, why: str, timestamp: int) -> None:
        self.basis = "send timestamp" if _defined(timestamp) else "arrival"
        log.warning("NDI timecodes unusable (%s): timing audio and video by %s", why, self.basis)

    def video(self, timecode: int, timestamp: int, arrival: float) -> None:
        """A video frame with these NDI times arrived at ``arrival``."""
        if self.basis == "timecode":
            last, self._last_timecode = self._last_timecode, timecode
            if not _defined(timecode):
                self._fall_back(f"video timecode {timecode}", timestamp)
            elif last is not None and not 0 < timecode - last <= 10 * TICKS_PER_S:
                self._fall_back(f"video timecode went from {last} to {timecode}", timestamp)
        if _defined(timecode):
            self._clocks["timecode"].video(timecode / TICKS_PER_S, arrival)
        if _defined(timestamp):
            self._clocks["send timestamp"].video(timestamp / TICKS_PER_S, arrival)

    def audio(self, timecode: int, timestamp: int, arrival: float) -> float:
        """The monotonic time of the first sample of an audio frame that arrived now."""
        if self.basis == "timecode":
            at = self._clocks["timecode"].at(timecode / TICKS_PER_S, arrival)
            if abs(at - arrival) <= self.MAX_AUDIO_SKEW_S:
                return at
            self._fall_back(f"audio timecode {at - arrival:+.1f}s off its arrival", timestamp)
        if self.basis == "send timestamp" and _defined(timestamp):
            return self._clocks["send timestamp"].at(timestamp / TICKS_PER_S, arrival)
        return arrival


def _defined(ticks: int) -> bool:
    """Whether an NDI timecode or timestamp carries a time (0 and UNDEFINED do not)."""
    return ticks not in (0, UNDEFINED)


class NdiSource(Source):
    """Receive an NDI source by name; ``frames()`` raises SourceLost after ``lost_after``
    seconds without video, and picks the sender up again when called once more: it looks
    for the sender again (up to ``discovery_timeout``, else SourceLost once more) and
    reconnects if it came back at another address.

    What it promises: every video frame the NDI receiver hands over is yielded, in order.
    A consumer slower than the sender makes the NDI runtime's receive queue drop frames;
    the runtime counts them (``recv_get_performance``) and so does :attr:`dropped`, which
    ``state`` (the daemon's status field) shows."""

    kind = "ndi"
    carries_audio = True

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
        self._source = None  # what the receiver was pointed at
        self._lost = False  # frames() raised SourceLost: find the sender again
        self._closed = threading.Event()
        self._index = 0
        self._dropped_before = 0  # by receivers already destroyed
        self._times = NdiTimes()
        self._audio_format: str | None = None
        #: audio frames skipped because they cannot be played (see :attr:`audio_state`)
        self.audio_skipped = 0
        self._skip_reason = ""

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

    @property
    def audio_state(self) -> str:
        """``pcm 48k stereo`` once audio arrived (``none`` before), with skipped odd frames."""
        if self._audio_format is None:
            text = "none"
        else:
            text = self._audio_format
            if self._times.basis != "timecode":
                text += f", timed by {self._times.basis}"
        if self.audio_skipped:
            text += f", {self.audio_skipped} audio frames skipped ({self._skip_reason})"
        return text

    def _take_audio(self, frame, arrival: float) -> None:
        """Copy one NDI audio frame (before it is freed) and emit it in its own rate and
        channels, or skip it if odd."""
        channels, count, rate = frame.no_channels, frame.no_samples, frame.sample_rate
        if count <= 0 or rate <= 0 or channels not in LAYOUTS:
            self._skip_audio(
                f"{channels} channels, {count} samples at {rate} Hz; need 1-8 channels"
            )
            return
        samples = np.array(frame.data[:channels, :count], np.float32).T
        start = self._times.audio(frame.timecode, frame.timestamp, arrival)
        self._audio_format = f"pcm {format_name(rate, channels)}"
        self._emit_audio(AudioChunk(samples, start, rate))

    def _skip_audio(self, reason: str) -> None:
        if self._skip_reason != reason:
            log.warning("NDI %r: audio frame skipped: %s", self.name, reason)
            self._skip_reason = reason
        self.audio_skipped += 1

    def _find(self):
        self._state = f"looking for NDI source {self.name!r}"
        source, seen = discover(
            self.discovery_timeout,
            self.extra_ips,
            wanted=lambda name: _matches(name, self.name),
            closed=self._closed,
        )
        if source is not None:
            return source
        found = ", ".join(repr(s) for s in seen) or "none"
        raise MediaError(
            f"NDI source {self.name!r} not found within {self.discovery_timeout:g}s; "
            f"sources seen: {found}. Check the sender is running and reachable; without "
            "mDNS set extra_ips or an NDI config (NDI_CONFIG_DIR) listing its IP."
        )

    def _connect(self) -> None:
        ndi = ndi_lib()
        source = self._source = self._find()
        settings = ndi.RecvCreateV3()
        settings.source_to_connect_to = source
        settings.color_format = ndi.RECV_COLOR_FORMAT_RGBX_RGBA
        settings.bandwidth = ndi.RECV_BANDWIDTH_HIGHEST
        settings.allow_video_fields = False
        self._receiver = ndi.recv_create_v3(settings)
        if self._receiver is None:
            raise MediaError(f"could not create an NDI receiver for {self.name!r}")
        self._state = f"connecting to {source.ndi_name!r}"

    def _reconnect(self) -> None:
        """After a loss, find the sender again and point the receiver at it if it moved: a
        sender that restarts may listen on another port, and the NDI receiver's own lookup
        by name can miss it for good (see :data:`FINDER_EVERY_S`). Not found: SourceLost."""
        try:
            source = self._find()
        except MediaError as exc:
            self._state = "lost, waiting for sender"
            raise SourceLost(f"NDI {self.name!r}: {self._state} ({exc})") from exc
        if self._source is None or source.url_address != self._source.url_address:
            log.info("NDI %r: sender found at %s, reconnecting", self.name, source.url_address)
            ndi_lib().recv_connect(self._receiver, source)
        self._source = source
        self._state = f"connecting to {source.ndi_name!r}"

    def frames(self) -> Iterator[Frame]:
        ndi = ndi_lib()
        if self._receiver is None:
            self._connect()
        elif self._lost:
            self._reconnect()
        self._lost = False
        live_since: float | None = None
        last_video = time.monotonic()
        self._times.reset()  # a lost sender may come back with other timecodes
        while not self._closed.is_set():
            kind, video, audio, _ = ndi.recv_capture_v3(self._receiver, 200, True, True, False)
            now = time.monotonic()
            if kind == ndi.FRAME_TYPE_VIDEO:
                try:
                    image = np.ascontiguousarray(video.data[:, :, :3])
                    self.fps = Fraction(video.frame_rate_N, max(1, video.frame_rate_D))
                    self._times.video(video.timecode, video.timestamp, now)
                finally:
                    ndi.recv_free_video_v2(self._receiver, video)
                if live_since is None:
                    live_since = now
                    self._state = "live"
                last_video = now
                yield Frame(image, now, self._index)
                self._index += 1
                continue
            if kind == ndi.FRAME_TYPE_AUDIO:
                try:
                    self._take_audio(audio, now)
                finally:
                    ndi.recv_free_audio_v3(self._receiver, audio)
            if live_since is not None and now - last_video > self.lost_after:
                self._state = f"lost (no video for {self.lost_after:g}s), waiting for sender"
                self._lost = True
                raise SourceLost(f"NDI {self.name!r}: {self._state}")

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
    ``state``). The newest frame is always sent, also the last one before ``close()``.

    With audio (any ``audio`` mode but ``off``: NDI audio is always PCM), ``send_audio()`` queues
    the samples for a second thread that sends them as planar float, in the rate and channels they
    come in (the source's), in the same NDI sender; more than ``SINK_AUDIO_QUEUE_S`` queued drops
    the oldest (counted in :attr:`audio_dropped`). Every video frame's timecode is the time
    ``send()`` was called and every audio frame's the ``at`` it was given, both as UTC in 100 ns
    units, so a receiver can line them up."""

    kind = "ndi"

    def __init__(
        self,
        url: str,
        *,
        width: int,
        height: int,
        fps: float,
        audio: str = "off",
        audio_format: tuple[int, int] | None = None,  # NDI: each chunk in its own format
    ) -> None:
        super().__init__(width=width, height=height, fps=fps)
        ndi = ndi_lib()
        self.name = self.label = _name(url)
        self.audio = "pcm" if audio_track(audio, self.label) else ""  # NDI audio is PCM
        # timecodes: the monotonic send times as UTC (what NDI's own timestamps count)
        self._utc_offset = time.time() - time.monotonic()
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
        self._slot: LatestSlot[tuple[np.ndarray, float]] = LatestSlot(drain=True)
        # (channels, n) planar, at, rate
        self._audio_queue: deque[tuple[np.ndarray, float, int]] = deque()
        self._audio_queued = 0.0  # seconds in the queue
        self._audio_cond = threading.Condition()
        self._audio_closed = False
        #: seconds of audio dropped because the audio queue was full
        self.audio_dropped = 0.0
        workers = [self._run] + ([self._run_audio] if self.audio else [])
        self._threads = [
            threading.Thread(target=work, name=f"ndi {self.name}", daemon=True) for work in workers
        ]
        for thread in self._threads:
            thread.start()

    @property
    def dropped(self) -> int:
        return self._slot.dropped

    @property
    def state(self) -> str:
        """How many receivers watch this source."""
        count = ndi_lib().send_get_no_connections(self._sender, 0)
        text = f"live, {count} receiver{'s' if count != 1 else ''}"
        if self.dropped:
            text += f", {self.dropped} dropped"
        if self.audio_dropped:
            text += f", {self.audio_dropped:.1f} s audio dropped"
        return text

    def timecode(self, at: float) -> int:
        """NDI timecode (UTC, 100 ns) of the monotonic time ``at``."""
        return round((at + self._utc_offset) * TICKS_PER_S)

    def send(self, image: np.ndarray, at: float | None = None) -> None:
        self.check(image)
        self._slot.put((image.copy(), time.monotonic() if at is None else at))

    def send_audio(
        self,
        samples: np.ndarray,
        at: float,
        rate: int = RATE,
        coded: Sequence[tuple[CodedAudio, float]] = (),  # NDI carries PCM only
    ) -> None:
        """Queue ``(n, channels)`` float32 samples for the audio thread; never waits."""
        if not self.audio or not len(samples):
            return
        planar = np.ascontiguousarray(samples.T, np.float32)  # NDI's layout, and our copy
        with self._audio_cond:
            self._audio_queue.append((planar, at, rate))
            self._audio_queued += len(samples) / rate
            while self._audio_queued > SINK_AUDIO_QUEUE_S and len(self._audio_queue) > 1:
                old, _, old_rate = self._audio_queue.popleft()
                self._audio_queued -= old.shape[1] / old_rate
                self.audio_dropped += old.shape[1] / old_rate
            self._audio_cond.notify()

    def _run(self) -> None:
        ndi = ndi_lib()
        while (taken := self._slot.take()) is not None:
            image, sent_at = taken
            self._rgbx[:, :, :3] = image
            self._frame.data = self._rgbx
            self._frame.timecode = self.timecode(sent_at)
            ndi.send_send_video_v2(self._sender, self._frame)

    def _run_audio(self) -> None:
        """Send queued audio until closed; what was queued before ``close()`` still goes."""
        ndi = ndi_lib()
        frame = ndi.AudioFrameV2()
        while True:
            with self._audio_cond:
                self._audio_cond.wait_for(lambda: self._audio_queue or self._audio_closed)
                if not self._audio_queue:
                    return
                planar, at, rate = self._audio_queue.popleft()
                self._audio_queued -= planar.shape[1] / rate
            frame.sample_rate, frame.no_channels = rate, planar.shape[0]
            frame.data = planar
            frame.no_samples = planar.shape[1]
            frame.timecode = self.timecode(at)
            ndi.send_send_audio_v2(self._sender, frame)

    def close(self) -> None:
        self._slot.close()
        with self._audio_cond:
            self._audio_closed = True
            self._audio_cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
        ndi_lib().send_destroy(self._sender)


#: a unicast query (``extra_ips``, the config's ``"ips"``) reaches only one NDI process of a
#: host: every process with a sender listens on the host's port 5960 (SO_REUSEPORT) and the
#: kernel hands each connection to one of them, which answers with its own sources only (so
#: a finder in a process with a sender often sees just that). Discovery therefore starts a
#: fresh finder (a new connection) this often, keeping the last FINDERS alive, and takes
#: every source any of them sees.
FINDER_EVERY_S = 0.5
FINDERS = 4


def discover(
    timeout: float,
    extra_ips: str | None = None,
    *,
    wanted: Callable[[str], bool] | None = None,
    closed: threading.Event | None = None,
) -> tuple[object | None, list[str]]:
    """NDI discovery for ``timeout`` seconds (mDNS, or unicast to ``extra_ips`` / the NDI
    config's IPs): the first source whose name is ``wanted`` (as soon as it is seen; ``None``
    if none is, or without ``wanted``) and the sorted names of all sources seen."""
    ndi = ndi_lib()
    settings = ndi.FindCreate()
    if extra_ips:
        settings.extra_ips = extra_ips
    finders: deque = deque()
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    next_finder = time.monotonic()
    try:
        while closed is None or not closed.is_set():
            now = time.monotonic()
            if now >= next_finder:
                if len(finders) == FINDERS:
                    ndi.find_destroy(finders.popleft())
                finders.append(ndi.find_create_v2(settings))
                next_finder = now + FINDER_EVERY_S
            for finder in finders:
                for source in ndi.find_get_current_sources(finder):
                    seen.add(source.ndi_name)
                    if wanted is not None and wanted(source.ndi_name):
                        return _copy_source(ndi, source), sorted(seen)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            wait = min(left, max(next_finder - time.monotonic(), 0.01))
            ndi.find_wait_for_sources(finders[-1], int(wait * 1000))
    finally:
        for finder in finders:
            ndi.find_destroy(finder)
    return None, sorted(seen)


def _copy_source(ndi: ModuleType, source):
    """A source description that outlives the finder it came from."""
    copy = ndi.Source()
    copy.ndi_name, copy.url_address = source.ndi_name, source.url_address or ""
    return copy


def list_ndi_sources(timeout: float = 1.5, extra_ips: str | None = None) -> list[Device]:
    """NDI sources found within ``timeout`` seconds, for the ``devices`` command. Without
    ndi-python, one unavailable entry that says how to install it. Discovery is mDNS, or
    unicast to ``extra_ips`` / the IPs in the NDI config file under ``NDI_CONFIG_DIR``."""
    if not is_installed():
        return [Device("ndi", "ndi:NAME", "NDI", available=False, note=MISSING_MESSAGE)]
    try:
        ndi_lib()
    except MediaError as exc:
        return [Device("ndi", "ndi:NAME", "NDI", available=False, note=str(exc))]
    _, names = discover(timeout, extra_ips)
    return [Device("ndi", f"ndi:{name}", name, note=_address(name)) for name in names]


def _address(full_name: str) -> str:
    """``MACHINE (stream)`` -> the short form ``ndi:stream`` also accepted, as a note."""
    stream = full_name.rpartition("(")[2].removesuffix(")")
    return f"also ndi:{stream}" if "(" in full_name and stream else ""


if is_installed():
    register_source(NdiSource.kind, NdiSource)
    register_sink(NdiSink.kind, NdiSink)
