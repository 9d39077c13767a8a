"""The one AAC audio track setup, for the sinks that encode sound beside their H.264 video.

The daemon hands a sink contiguous float32 chunks, each with the wall time its first sample
goes on air (:meth:`~broadcast_filter.media.base.Sink.send_audio`). :class:`AacTrack` puts
them on the video's timeline: with ``t0`` the time the sink's first video frame was sent
(video pts ``round((sent_at - t0) * fps)``), a chunk on air at ``at`` starts at audio pts
``round((at - t0) * RATE)``. The track starts at ``t0`` with the video: samples before it
are dropped, a first chunk that starts later is preceded by silence; it is continuous (a gap
between chunks is filled with silence, an overlap trimmed), encoded in the encoder's blocks
of 1024 samples. The encoder's first packet is its priming (pts -1024):
MP4 and MKV record it as such (the decoder skips it), MPEG-TS and FLV cannot carry a
negative time (it wraps), so there it is not muxed.
"""

from __future__ import annotations

import av
import numpy as np

from broadcast_filter.media.audio import LAYOUT, RATE, silence

#: containers that cannot carry the encoder's priming (a negative timestamp)
NO_PRIMING = frozenset({"flv", "mpegts"})


class AacTrack:
    """An AAC stream in ``container``; :meth:`add` returns the packets to mux."""

    def __init__(self, container: av.container.OutputContainer, bitrate: int) -> None:
        self.stream = container.add_stream("aac", rate=RATE, layout=LAYOUT)
        self.stream.bit_rate = bitrate
        self._drop_priming = container.format.name in NO_PRIMING
        self._block = self.stream.codec_context.frame_size or 1024
        self._pending = silence(0)
        self._next: int | None = None  # audio pts of the first pending sample
        #: samples written to the track (silence filling gaps included)
        self.samples = 0

    def add(self, samples: np.ndarray, at: float, t0: float) -> list[av.Packet]:
        """Place ``samples`` (on air at ``at``) on the timeline that starts at ``t0``."""
        start = round((at - t0) * RATE)
        if self._next is None:
            self._next = 0  # so the priming sits at -1024, where MP4 and MKV expect it
        end = self._next + len(self._pending)  # where the next sample would go
        if start < end:  # overlap (or before t0): keep only what is new
            samples = samples[min(len(samples), end - start) :]
        elif start > end:  # a gap: silence, so the track stays continuous
            samples = np.concatenate([silence(start - end), samples])
        self._pending = np.concatenate([self._pending, samples])
        return self._encode(final=False)

    def flush(self) -> list[av.Packet]:
        """The last partial block (padded with silence) and the encoder's remaining packets."""
        if self._next is None:
            return []
        if len(self._pending) % self._block:
            pad = self._block - len(self._pending) % self._block
            self._pending = np.concatenate([self._pending, silence(pad)])
        return self._encode(final=True)

    def _encode(self, *, final: bool) -> list[av.Packet]:
        assert self._next is not None
        packets: list[av.Packet] = []
        block = self._block
        while len(self._pending) >= block:
            planar = np.ascontiguousarray(self._pending[:block].T)
            frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=LAYOUT)
            frame.sample_rate = RATE
            frame.pts = self._next
            packets += self.stream.encode(frame)
            self._pending = self._pending[block:]
            self._next += block
            self.samples += block
        if final:
            packets += self.stream.encode(None)
        if self._drop_priming:
            packets = [p for p in packets if p.pts is None or p.pts >= 0]
        return packets
