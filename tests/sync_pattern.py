"""An A/V sync pattern and its independent reader (issue 12).

The pattern is what broadcast engineers use: a white flash on black video and a 1 kHz beep
at the same instants, every ``PERIOD`` seconds, made by the ffmpeg CLI (``lavfi``), so the
sender is not our code. :func:`measure` reads any output back with PyAV, finds each flash
(the first frame of a run whose mean brightness jumps) and each beep (the first sample of a
run whose envelope is loud) by their timestamps, and pairs them: ``offset = beep - flash``,
positive when the audio is late. The reader knows nothing of the daemon.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics

import av
import numpy as np

PERIOD = 2.0  # seconds between flashes
FLASH = 0.2  # seconds the flash and the beep last
RATE = 48_000
#: broadcast tolerance (ITU-R BT.1359 / EBU R37 style): audio at most 40 ms early, 60 ms late
EARLY, LATE = -0.040, 0.060


def lavfi_inputs(
    size: tuple[int, int], fps: float, seconds: float, *, realtime: bool = True
) -> list[str]:
    """ffmpeg input arguments: the flashing video and the beeping audio, in step (read at
    real time, unless ``realtime`` is false: for a file)."""
    w, h = size
    on = f"lt(mod(t\\,{PERIOD:g})\\,{FLASH:g})"
    video = (
        f"color=c=black:s={w}x{h}:r={fps:g}:d={seconds:g},"
        f"drawbox=x=0:y=0:w=iw:h=ih:color=white:t=fill:enable='{on}'"
    )
    beep = f"if(lt(mod(t,{PERIOD:g}),{FLASH:g}),0.8*sin(2*PI*1000*t),0)"
    audio = f"aevalsrc='{beep}|{beep}':s={RATE}:d={seconds:g}"
    re = ["-re"] if realtime else []
    return [*re, "-f", "lavfi", "-i", video, *re, "-f", "lavfi", "-i", audio]


def publish_argv(
    url: str,
    fmt: str,
    size: tuple[int, int],
    fps: float,
    seconds: float,
    *,
    rate: int = RATE,
    channels: int = 2,
    realtime: bool = True,
    audio_codec: str = "aac",
) -> list[str]:
    """The ffmpeg command that publishes the pattern (H.264 + ``audio_codec``, AAC by
    default, in ``rate`` Hz, ``channels`` channels) to ``url`` as ``fmt`` (or writes it to a
    file, not in real time)."""
    gop = str(max(1, round(fps)))
    inputs = lavfi_inputs(size, fps, seconds, realtime=realtime)
    return ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *inputs,
            "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", gop,
            "-pix_fmt", "yuv420p", "-c:a", audio_codec, "-b:a", "128k", "-ar", str(rate),
            "-ac", str(channels), "-f", fmt, url]  # fmt: skip


@dataclasses.dataclass
class Reading:
    """What :func:`measure` found: onsets (seconds, stream time) and paired offsets."""

    flashes: list[float]
    beeps: list[float]
    pairs: list[tuple[float, float]]  # (flash time, offset of its beep)
    audio_samples: int
    audio_duration: float  # from the first to the last audio sample's timestamp
    video_frames: int
    video_start: float  # the first video frame's time
    audio_gaps: list[float]  # jumps between decoded audio frames (s; + gap, - overlap)

    @property
    def offsets(self) -> list[float]:
        return [o for _, o in self.pairs]

    @property
    def worst(self) -> float:
        return max(self.offsets, key=abs)

    @property
    def median(self) -> float:
        return statistics.median(self.offsets)

    def in_tolerance(self) -> bool:
        return all(EARLY <= o <= LATE for o in self.offsets)

    def summary(self) -> str:
        ms = ", ".join(f"{o * 1000:+.0f}" for o in self.offsets)
        return f"{len(self.offsets)} pairs, offsets ms: [{ms}]"


def measure(path: str, *, fmt: str | None = None, options: dict | None = None) -> Reading:
    """Read a recording (or a stream) to the end and pair its flashes with its beeps."""
    container = av.open(path, format=fmt, options=options or {})
    try:
        video, audio = container.streams.video[0], container.streams.audio[0]
        mono = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        brightness: list[tuple[float, float]] = []
        chunks: list[tuple[float, np.ndarray]] = []
        for packet in container.demux(video, audio):
            for frame in packet.decode():
                if frame.time is None:
                    continue
                if isinstance(frame, av.VideoFrame):
                    luma = frame.to_ndarray(format="gray")
                    brightness.append((frame.time, float(luma.mean())))
                else:
                    chunks += [(o.time, o.to_ndarray()[0]) for o in mono.resample(frame)]
    finally:
        container.close()
    flashes = flash_onsets(brightness)
    beeps, samples, span = beep_onsets(chunks)
    pairs = pair(flashes, beeps)
    start = min((t for t, _ in brightness), default=0.0)
    return Reading(flashes, beeps, pairs, samples, span, len(brightness), start, _gaps(chunks))


def _gaps(chunks: list[tuple[float, np.ndarray]]) -> list[float]:
    """Where a decoded audio frame does not start where the previous one ended (more than a
    millisecond off: FLV stamps in whole milliseconds, and a 44.1 kHz track's frames, read
    back at 48 kHz, carry those stamps' rounding; a lost or doubled frame is 20 ms)."""
    gaps = []
    for (t0, a), (t1, _) in itertools.pairwise(chunks):
        jump = t1 - (t0 + len(a) / RATE)
        if abs(jump) > 0.001:
            gaps.append(jump)
    return gaps


def flash_onsets(brightness: list[tuple[float, float]]) -> list[float]:
    """Times of frames that are much brighter than the frame before (mid-way threshold)."""
    brightness.sort()
    values = np.array([b for _, b in brightness])
    if len(values) < 2:
        return []
    lo, hi = np.percentile(values, 5), np.percentile(values, 99)
    if hi - lo < 20:  # no flash visible at all
        return []
    bright = values > (lo + hi) / 2
    return [brightness[i][0] for i in range(1, len(values)) if bright[i] and not bright[i - 1]]


def beep_onsets(chunks: list[tuple[float, np.ndarray]]) -> tuple[list[float], int, float]:
    """Times of the first loud sample of each beep, the sample count and the time span."""
    if not chunks:
        return [], 0, 0.0
    chunks.sort(key=lambda c: c[0])
    total = sum(len(c) for _, c in chunks)
    end = chunks[-1][0] + len(chunks[-1][1]) / RATE
    onsets: list[float] = []
    loud_until = -1.0
    for t, pcm in chunks:
        loud = np.flatnonzero(np.abs(pcm) > 0.3)
        for i in loud:
            at = t + i / RATE
            if at > loud_until + FLASH / 2:  # a new beep, not the rest of the last one
                onsets.append(at)
            loud_until = at
    return onsets, total, end - chunks[0][0]


def pair(flashes: list[float], beeps: list[float]) -> list[tuple[float, float]]:
    """For each flash, the offset of the nearest beep (within half a period)."""
    pairs = []
    for flash in flashes:
        near = [b - flash for b in beeps if abs(b - flash) < PERIOD / 2]
        if near:
            pairs.append((flash, min(near, key=abs)))
    return pairs
