"""Audio as it travels through the daemon: float32 PCM in the source's format, stamped on the
video's clock.

Every source that carries sound converts it to interleaved float32 at the stream's own
sample rate and channel count (PyAV's resampler only re-packs it; a layout that is not the
standard one for its channel count, 3.0 say, is remixed to the standard one, 2.1), so a
44.1 kHz mono microphone leaves the daemon 44.1 kHz mono. Before a source's sound is known
the daemon works in :data:`RATE` Hz :data:`LAYOUT` (what OBS, NDI and every streaming
platform use by default). Each chunk is stamped
with the ``time.monotonic()`` of its first sample, the clock of
:attr:`~broadcast_filter.media.base.Frame.captured_at`. The stamp comes from the stream's
own timestamps mapped onto that clock by :class:`MediaClock`, so audio and video captured at
the same instant carry the same time even though they arrive at different moments. The
daemon's :class:`~broadcast_filter.runtime.av_sync.AudioLine` then delays the audio by
the video's latency and hands it to the sinks that carry sound.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

#: the audio format before a source's is known: what OBS, NDI and every platform default to
RATE = 48_000
LAYOUT = "stereo"
CHANNELS = 2
#: FFmpeg's standard layout for each channel count (what a chunk of that many channels is)
LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
#: what a sink does with audio (``audio:`` in a sink's options): the source's own AAC
#: packets where they fit the container (``copy``, else encoded), always encode AAC, or no
#: audio track
AUDIO_MODES = ("copy", "aac", "off")
#: the default AAC bitrate of a sink's audio track, bits/s
AUDIO_BITRATE = 160_000


@dataclass(frozen=True)
class AudioChunk:
    """Samples ``(n, channels)`` float32 in -1..1 at ``rate`` Hz; ``captured_at`` is the
    ``time.monotonic()`` of the first sample, on the clock of the video frames."""

    samples: np.ndarray
    captured_at: float
    rate: int = RATE

    @property
    def channels(self) -> int:
        return self.samples.shape[1]


@dataclass(frozen=True)
class CodedAudio:
    """One AAC frame as the source sent it (raw, without an ADTS header), for sinks that
    copy the source's audio: ``samples`` long at ``rate`` Hz, ``channels`` channels, coded
    as ``profile`` (``"LC"``; only AAC-LC is copied); ``captured_at`` as for
    :class:`AudioChunk`."""

    data: bytes
    captured_at: float
    samples: int
    rate: int
    channels: int
    profile: str = "LC"


def layout_name(channels: int) -> str:
    """The layout a chunk of ``channels`` channels is: ``stereo``; ``"9ch"`` beyond 7.1."""
    return LAYOUTS.get(channels, f"{channels}ch")


def format_name(rate: int, channels: int) -> str:
    """``"48k stereo"``, ``"44.1k mono"``."""
    return f"{rate / 1000:g}k {layout_name(channels)}"


class MediaClock:
    """Maps a stream's media time (seconds, from its timestamps) onto ``time.monotonic()``.

    Each decoded video frame gives ``arrival - media_time``; the smallest seen is the offset
    (the frame that met the least delay on its way). A source stamps its video
    (:meth:`video`) and its audio (:meth:`at`) with it, so both carry the time the stream
    says they were captured, on one clock, whatever jitter each met on the way; the
    daemon's latency figures then start from the earliest possible arrival. A jump in the
    timestamps (a publisher that restarts its clock) of more than :data:`REANCHOR_S`
    re-anchors the clock; a new connection calls :meth:`reset`.
    """

    REANCHOR_S = 1.0

    def __init__(self) -> None:
        self.offset: float | None = None

    def reset(self) -> None:
        self.offset = None

    def video(self, media_time: float | None, arrival: float) -> float:
        """Stamp a video frame of ``media_time`` that arrived at ``arrival`` (and learn the
        offset from it); without a media time, the arrival itself."""
        if media_time is None:
            return arrival
        offset = arrival - media_time
        if self.offset is None or offset < self.offset or offset > self.offset + self.REANCHOR_S:
            self.offset = offset
        return media_time + self.offset

    def at(self, media_time: float | None, arrival: float) -> float:
        """Stamp audio of ``media_time``: on the video's offset (audio arrives later than
        its video, being encoded in blocks, so it does not move the offset); before any
        video, its own arrival anchors the clock."""
        if media_time is None:
            return arrival
        if self.offset is None:
            self.offset = arrival - media_time
        return media_time + self.offset


class AudioConverter:
    """Decoded PyAV audio frames -> ``(n, channels)`` float32 arrays, at the frame's own rate
    and channel count (or at ``rate`` / ``channels`` when given: a sink that must keep the
    format it opened with). :attr:`rate` and :attr:`channels` are those of the last output."""

    def __init__(self, rate: int | None = None, channels: int | None = None) -> None:
        self._want = (rate, channels)
        self._resampler: av.AudioResampler | None = None
        self._key: tuple[int, int] | None = None
        self.rate, self.channels = rate or RATE, channels or CHANNELS

    def convert(self, frame: av.AudioFrame) -> np.ndarray:
        """Every sample the resampler has ready (may be empty while it fills)."""
        rate = self._want[0] or frame.sample_rate
        channels = self._want[1] or frame.layout.nb_channels
        if (rate, channels) != self._key:  # a new format (a new publisher): a new resampler
            layout = LAYOUTS.get(channels, LAYOUT)
            channels = av.AudioLayout(layout).nb_channels
            self._resampler = av.AudioResampler(format="flt", layout=layout, rate=rate)
            self._key, self.rate, self.channels = (rate, channels), rate, channels
        assert self._resampler is not None
        out = [f.to_ndarray().reshape(-1, self.channels) for f in self._resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros((0, self.channels), np.float32)

    def convert_array(self, samples: np.ndarray, rate: int) -> np.ndarray:
        """The same for ``(n, channels)`` float32 samples at ``rate``."""
        planar = np.ascontiguousarray(samples.T, np.float32)
        layout = LAYOUTS.get(samples.shape[1], LAYOUT)
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = rate
        return self.convert(frame)


def describe(codec: av.AudioCodecContext | None) -> str:
    """``"aac 48k stereo"`` for a stream's decoder, ``"none"`` without one."""
    if codec is None:
        return "none"
    rate = codec.sample_rate or 0
    khz = f"{rate / 1000:g}k"
    layout = codec.layout.name if codec.layout is not None else f"{codec.channels}ch"
    return f"{codec.name} {khz} {layout}"


def stream_format(codec: av.AudioCodecContext | None) -> tuple[int, int] | None:
    """``(rate, channels)`` that a stream's audio travels in (:class:`AudioConverter`'s
    choice for it), where the stream says; ``None`` without audio or a known format."""
    if codec is None or not codec.sample_rate or codec.layout is None:
        return None
    channels = codec.layout.nb_channels
    return codec.sample_rate, channels if channels in LAYOUTS else CHANNELS


def silence(samples: int, channels: int = CHANNELS) -> np.ndarray:
    return np.zeros((samples, channels), np.float32)
