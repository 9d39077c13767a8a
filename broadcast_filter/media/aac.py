"""The one AAC audio track setup, for the sinks that encode sound beside their H.264 video.

The daemon hands a sink contiguous float32 chunks, each with the wall time its first sample goes on
air (:meth:`~broadcast_filter.media.base.Sink.send_audio`). :class:`AacTrack` puts them on the
video's timeline: with ``t0`` the time the sink's first video frame was sent (video pts
``round((sent_at - t0) * fps)``), a chunk on air at ``at`` starts at audio pts ``round((at - t0) *
rate)``, in the track's rate and channels (the source's, as they were when the sink opened; see
:meth:`AacTrack.fits`). The track starts at ``t0`` with the video: samples before it are dropped, a
first chunk that starts later is preceded by silence; it is continuous (a gap between chunks is
filled with silence, an overlap trimmed), encoded in the encoder's blocks of 1024 samples. The
encoder's first packet is its priming (pts -1024): MP4 and MKV record it as such (the decoder skips
it), MPEG-TS and FLV cannot carry a negative time (it wraps), so there it is not muxed.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

from broadcast_filter.media.audio import (
    CHANNELS,
    RATE,
    AudioConverter,
    CodedAudio,
    layout_name,
    silence,
)

#: a chunk this close to where the last ended follows on from it (seconds)
SNAP_S = 0.002
#: containers that cannot carry the encoder's priming (a negative timestamp)
NO_PRIMING = frozenset({"flv", "mpegts"})


class AacTrack:
    """An AAC stream of ``rate`` Hz, ``channels`` channels in ``container``; :meth:`add`
    returns the packets to mux. Samples in another format are converted to the track's
    (:meth:`fits` says whether they need to be)."""

    def __init__(
        self,
        container: av.container.OutputContainer,
        bitrate: int,
        rate: int = RATE,
        channels: int = CHANNELS,
    ) -> None:
        self.rate, self.channels, self._layout = rate, channels, layout_name(channels)
        self.stream = container.add_stream("aac", rate=rate, layout=self._layout)
        self.stream.bit_rate = bitrate
        self._drop_priming = container.format.name in NO_PRIMING
        self._block = self.stream.codec_context.frame_size or 1024
        self._pending = silence(0, channels)
        self._next: int | None = None  # audio pts of the first pending sample
        self._converter: AudioConverter | None = None

    def fits(self, rate: int, channels: int) -> bool:
        """Whether samples of this format go in as they are."""
        return (rate, channels) == (self.rate, self.channels)

    def add(self, samples: np.ndarray, at: float, t0: float, rate: int = RATE) -> list[av.Packet]:
        """Place ``samples`` (``rate`` Hz, on air at ``at``) on the timeline from ``t0``."""
        if not self.fits(rate, samples.shape[1]):
            if self._converter is None:
                self._converter = AudioConverter(self.rate, self.channels)
            samples = self._converter.convert_array(samples, rate)
        start = round((at - t0) * self.rate)
        if self._next is None:
            self._next = 0  # so the priming sits at -1024, where MP4 and MKV expect it
        end = self._next + len(self._pending)  # where the next sample would go
        if abs(start - end) <= SNAP_S * self.rate:  # contiguous (a resampler's output varies)
            start = end
        if start < end:  # overlap (or before t0): keep only what is new
            samples = samples[min(len(samples), end - start) :]
        elif start > end:  # a gap: silence, so the track stays continuous
            samples = np.concatenate([silence(start - end, self.channels), samples])
        self._pending = np.concatenate([self._pending, samples])
        return self._encode(final=False)

    def flush(self) -> list[av.Packet]:
        """The last partial block (padded with silence) and the encoder's remaining packets."""
        if self._next is None:
            return []
        if len(self._pending) % self._block:
            pad = self._block - len(self._pending) % self._block
            self._pending = np.concatenate([self._pending, silence(pad, self.channels)])
        return self._encode(final=True)

    def _encode(self, *, final: bool) -> list[av.Packet]:
        assert self._next is not None
        packets: list[av.Packet] = []
        block = self._block
        while len(self._pending) >= block:
            planar = np.ascontiguousarray(self._pending[:block].T)
            frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=self._layout)
            frame.sample_rate = self.rate
            frame.pts = self._next
            packets += self.stream.encode(frame)
            self._pending = self._pending[block:]
            self._next += block
        if final:
            packets += self.stream.encode(None)
        if self._drop_priming:
            packets = [p for p in packets if p.pts is None or p.pts >= 0]
        return packets


#: AAC sampling frequency indices and channel configurations (ISO/IEC 14496-3)
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
AAC_CHANNELS = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 8}
#: MPEG-4 audio object types by name (what a copy sink takes: LC, the one every platform plays)
PROFILES = {1: "Main", 2: "LC", 3: "SSR", 4: "LTP", 5: "HE", 29: "HEv2"}


def parse_config(config: bytes) -> tuple[str, int, int] | None:
    """``(profile, rate, channels)`` from an AudioSpecificConfig (FLV/MP4 extradata)."""
    if len(config) < 2:
        return None
    kind, freq = config[0] >> 3, ((config[0] & 7) << 1) | (config[1] >> 7)
    layout = (config[1] >> 3) & 0xF
    if freq >= len(AAC_RATES) or layout not in AAC_CHANNELS:
        return None
    return PROFILES.get(kind, str(kind)), AAC_RATES[freq], AAC_CHANNELS[layout]


def split_adts(data: bytes) -> tuple[bytes, tuple[str, int, int]] | None:
    """A whole ADTS frame (MPEG-TS carries AAC so) -> the raw frame and its ``(profile,
    rate, channels)``; ``None`` for anything else (a raw frame, several frames)."""
    if len(data) < 7 or data[0] != 0xFF or data[1] & 0xF6 != 0xF0:
        return None
    header = 7 if data[1] & 1 else 9
    kind, freq = (data[2] >> 6) + 1, (data[2] >> 2) & 0xF
    layout = ((data[2] & 1) << 2) | (data[3] >> 6)
    length = ((data[3] & 3) << 11) | (data[4] << 3) | (data[5] >> 5)
    blocks = (data[6] & 3) + 1
    if length != len(data) or blocks != 1 or freq >= len(AAC_RATES):
        return None
    if layout not in AAC_CHANNELS:
        return None
    return data[header:], (PROFILES.get(kind, str(kind)), AAC_RATES[freq], AAC_CHANNELS[layout])


def coded_frame(
    data: bytes, config: tuple[str, int, int] | None, decoded: av.AudioFrame
) -> CodedAudio | None:
    """The AAC-LC frame in a demuxed packet, for sinks that copy it (``captured_at`` left
    0): raw frames with the stream's ``config`` (FLV, MP4, MKV), ADTS frames by their own
    header (MPEG-TS); ``None`` for another profile, or one whose ``decoded`` rate is not
    its config's (HE-AAC signalled implicitly)."""
    adts = split_adts(data)
    raw, found = adts if adts is not None else (data, config)
    if found is None or found[0] != "LC" or decoded.sample_rate != found[1]:
        return None
    return CodedAudio(raw, 0.0, decoded.samples, found[1], found[2])


def stream_config(codec: av.AudioCodecContext) -> tuple[str, int, int] | None:
    """An AAC stream's ``(profile, rate, channels)`` from its extradata, if it has one."""
    if codec.name != "aac" or not codec.extradata:
        return None
    return parse_config(bytes(codec.extradata))


def silent_frame(rate: int, channels: int) -> bytes:
    """One AAC-LC frame of silence in a steady state (the encoder's fourth): repeated, it
    fills a copied track where the source sent nothing."""
    codec = av.CodecContext.create("aac", "w")
    codec.sample_rate, codec.layout, codec.format = rate, layout_name(channels), "fltp"
    packets: list[av.Packet] = []
    for i in range(4):
        frame = av.AudioFrame.from_ndarray(
            np.zeros((channels, 1024), np.float32), format="fltp", layout=layout_name(channels)
        )
        frame.sample_rate, frame.pts = rate, i * 1024
        packets += codec.encode(frame)
    return bytes(packets[-1])


class CopyTrack(AacTrack):
    """An AAC-LC track that carries the source's own frames (``audio: copy``), bit for bit.

    :meth:`add_coded` places each source frame at the time it goes on air, on a continuous
    grid: frames follow on from each other; where the on-air time jumps ahead (the delay
    grew, the source paused) the gap is filled with silent frames, where it falls back (the
    delay fell) the frames already covered are dropped, so a frame sits at most half a
    frame from its time. Frames of another profile, rate or channel count than the track's
    do not fit it (:meth:`fits`): the daemon's decoded audio is encoded instead, as it is
    whenever no frames come (before the source, while it is lost, a source without AAC).
    A delay change is a cut at a frame boundary (a copy cannot be crossfaded).
    """

    def __init__(
        self,
        container: av.container.OutputContainer,
        bitrate: int,
        rate: int = RATE,
        channels: int = CHANNELS,
    ) -> None:
        super().__init__(container, bitrate, rate, channels)
        self._silent = silent_frame(rate, channels)
        self._end: int | None = None  # track time after the last packet given out
        self._copy_end: int | None = None  # ... and after the last copied frame
        #: whether the last frame given out was the source's own
        self.copying = False

    def fits_coded(self, coded: CodedAudio) -> bool:
        """Whether a source frame can be copied into this track as it is."""
        return coded.profile == "LC" and self.fits(coded.rate, coded.channels)

    def add_coded(self, coded: CodedAudio, at: float, t0: float) -> list[av.Packet]:
        """Place one source frame (on air at ``at``) on the timeline from ``t0``."""
        n = coded.samples
        start = round((at - t0) * self.rate)
        end = self._end if self._end is not None else 0  # the track starts at t0, as AacTrack
        if start + n // 2 < end:  # already covered (the delay fell), or before t0
            return []
        packets = []
        while start - end >= n - n // 2:  # a gap of a frame or more: silence
            packets.append(self._packet(self._silent, end, n))
            end += n
        packets.append(self._packet(coded.data, end, n))
        self._end = self._copy_end = end + n
        self._next, self._pending = self._end, silence(0, self.channels)  # encode from here
        self.copying = True
        return packets

    def add(self, samples: np.ndarray, at: float, t0: float, rate: int = RATE) -> list[av.Packet]:
        """Decoded audio: dropped while the source's frames carry its time, else encoded."""
        span_end = round((at - t0) * self.rate) + round(len(samples) * self.rate / rate)
        if self._copy_end is not None and span_end <= self._copy_end + self._block:
            return []
        packets = []
        for packet in super().add(samples, at, t0, rate):
            if self._end is not None and packet.pts is not None and packet.pts < self._end:
                continue  # the encoder's tail from before the copied frames
            packets.append(packet)
            self.copying = False
            if packet.pts is not None:
                self._end = packet.pts + (packet.duration or self._block)
        return packets

    def _packet(self, data: bytes, pts: int, n: int) -> av.Packet:
        packet = av.Packet(data)
        packet.pts = packet.dts = pts
        packet.duration = n
        packet.time_base = Fraction(1, self.rate)
        packet.stream = self.stream
        return packet
