"""Audio as it travels through the daemon: float32 PCM in one format, stamped on the video's clock.

Every source that carries sound converts it to :data:`RATE` Hz :data:`LAYOUT` float32
(PyAV's resampler; a source already in that format is only re-packed) and stamps each chunk
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

#: the daemon's audio format: what OBS, NDI and every streaming platform use by default
RATE = 48_000
LAYOUT = "stereo"
CHANNELS = 2
#: what a sink encodes audio to (``audio:`` in a sink's options): AAC, or no audio track
AUDIO_MODES = ("aac", "off")
#: the default AAC bitrate of a sink's audio track, bits/s
AUDIO_BITRATE = 160_000


@dataclass(frozen=True)
class AudioChunk:
    """Samples ``(n, CHANNELS)`` float32 in -1..1 at :data:`RATE`; ``captured_at`` is the
    ``time.monotonic()`` of the first sample, on the clock of the video frames."""

    samples: np.ndarray
    captured_at: float


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
    """Decoded PyAV audio frames -> ``(n, CHANNELS)`` float32 arrays at :data:`RATE`."""

    def __init__(self) -> None:
        self._resampler = av.AudioResampler(format="flt", layout=LAYOUT, rate=RATE)

    def convert(self, frame: av.AudioFrame) -> np.ndarray:
        """Every sample the resampler has ready (may be empty while it fills)."""
        out = [f.to_ndarray().reshape(-1, CHANNELS) for f in self._resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros((0, CHANNELS), np.float32)


def describe(codec: av.AudioCodecContext | None) -> str:
    """``"aac 48k stereo"`` for a stream's decoder, ``"none"`` without one."""
    if codec is None:
        return "none"
    rate = codec.sample_rate or 0
    khz = f"{rate / 1000:g}k"
    layout = codec.layout.name if codec.layout is not None else f"{codec.channels}ch"
    return f"{codec.name} {khz} {layout}"


def silence(samples: int) -> np.ndarray:
    return np.zeros((samples, CHANNELS), np.float32)
