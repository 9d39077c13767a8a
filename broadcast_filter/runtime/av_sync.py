"""Keeping sound with the delayed picture: the lasting video delay, and an audio delay line.

The output thread knows, for every fresh picture it sends, how long ago the frame it shows
was captured (model time plus pacing). :class:`DelayTracker` turns those latencies into one
*lasting* delay: the middle of the recent ones' spread (it follows them freely while the
first window fills), changed only when it moves by more than the tolerance (one frame
interval, at most 30 ms), so the audio is not pulled about by the jitter of single frames.
A model slower than the source takes only some frames: an event (a clap, a flash) shows up
with the next frame it takes, up to the skipped span later than it happened
(:class:`SkippedInput`); the delay aims at the middle of that span too, so the sound is as
often a little early as a little late instead of always early.

:class:`AudioLine` holds the source's audio on its capture clock and emits it on a continuous output
timeline: output sample ``j`` goes on air at wall time ``j / rate`` (``time.monotonic()``, at the
source's own sample rate), so the number of samples emitted always equals the elapsed time times the
rate (no drift), and the samples it carries are those captured ``delay`` seconds earlier. Where no
input was captured (no audio, a lost source) it emits silence. When the lasting delay changes
(another preset, passthrough) the read position jumps once, with a short crossfade between the old
and the new position: no click, no pitch change. Where the video's latency spreads wider than
broadcast tolerance (a loaded machine, a model much slower than the input), no single delay keeps
every frame in sync: the tracker counts the frames off sync and the status line says what share of
the recent ones are. Audio is emitted a margin behind the wall clock, so samples that arrive a
little after their video frame (audio is encoded in blocks) are already there: as much as the held
delay does not already cover. Sinks place each chunk by its ``at`` time, so the margin adds no
offset.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque

import numpy as np

from broadcast_filter.media.audio import CHANNELS, RATE, AudioChunk, CodedAudio, silence

#: a chunk that starts this close to where the previous one ended is taken as contiguous
#: (stamps carry rounding and the stream's own timestamp jitter)
SNAP_S = 0.004
#: most audio one pull emits: a longer output stall skips ahead (counted) instead
MAX_PULL_S = 2.0
#: capture times further apart than this are a break (a lost source), not frame spacing
MAX_GAP_S = 1.0


class DelayTracker:
    """The lasting video delay from per-frame latencies (see the module docstring).

    An event (a clap, a flash) captured just before a shown frame appears that frame's
    latency later; one captured in the input skipped before it (:class:`SkippedInput`)
    appears up to that much later still. So each recent frame says: events show up between
    ``latency`` and ``latency + skipped`` after they happen. Frames do not all wait alike
    either (each waits for the next output tick). The delay is the one that puts the most of
    those recent spans inside the sync window (:data:`EARLY_S` .. :data:`LATE_S`, broadcast
    tolerance with 10 ms to spare on each side), the middle of the best choices: a stray
    frame costs a little coverage, it does not move the delay.
    """

    #: the sync window aimed at: audio at most this early / late (tolerance 40 / 60 ms)
    EARLY_S, LATE_S = 0.030, 0.050
    #: broadcast tolerance: a frame whose events may meet audio further off is off sync
    TOLERANCE_EARLY_S, TOLERANCE_LATE_S = 0.040, 0.060
    #: where a steady latency puts the sound: the window's middle, this much late
    CENTRE_S = (LATE_S - EARLY_S) / 2

    def __init__(self, fps: float, *, window: int = 15, max_tolerance: float = 0.03) -> None:
        self.tolerance = min(1.0 / fps, max_tolerance)
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)  # (soonest, latest)
        self.delay: float | None = None
        #: how many times the lasting delay changed after the first window
        self.changes = 0
        #: fresh frames seen, and those an event of which may meet its sound outside
        #: broadcast tolerance (the video's spread is wider than any one delay can cover:
        #: a loaded machine, a model slower than the input)
        self.frames = 0
        self.off_sync = 0
        self._recent_off: deque[bool] = deque(maxlen=window)

    def target(self) -> float:
        """Where the delay should be, from the recent frames' event delays."""
        spans = list(self._recent)
        early, late = self.EARLY_S, self.LATE_S

        def covered(delay: float) -> float:
            lo, hi = delay - late, delay + early  # events shown this long after happening
            total = 0.0
            for a, b in spans:
                if b - a < 1e-9:
                    total += lo - 1e-9 <= a <= hi + 1e-9
                else:
                    total += max(0.0, min(b, hi) - max(a, lo)) / (b - a)
            return total

        # coverage changes slope only where a window edge meets a span's end
        candidates = sorted({e + d for span in spans for e in span for d in (late, -early)})
        scores = [covered(c) for c in candidates]
        best = max(scores)
        good = [c for c, score in zip(candidates, scores, strict=True) if score >= best - 1e-6]
        middle = (good[0] + good[-1]) / 2
        return (
            middle if covered(middle) >= best - 1e-6 else min(good, key=lambda c: abs(c - middle))
        )

    def observe(self, latency: float, skipped: float = 0.0) -> bool:
        """Take one fresh frame's latency and the input skipped before it (an event there
        shows up with this frame); True when the lasting delay changed."""
        self._recent.append((latency, latency + skipped))
        target = self.target()
        changed = False
        if self.delay is None or len(self._recent) < (self._recent.maxlen or 0):
            changed = target != self.delay
            self.delay = target  # settling: the first window follows the target freely
        elif abs(target - self.delay) > self.tolerance:
            self.delay = target
            self.changes += 1
            changed = True
        off = not (
            self.delay - self.TOLERANCE_LATE_S
            <= latency
            <= latency + skipped
            <= self.delay + self.TOLERANCE_EARLY_S
        )
        self.frames += 1
        self.off_sync += off
        self._recent_off.append(off)
        return changed

    @property
    def recent_off_sync(self) -> float:
        """The share of the recent frames that are off sync (0 .. 1)."""
        return sum(self._recent_off) / len(self._recent_off) if self._recent_off else 0.0


class SkippedInput:
    """How much input a model slower than the source skips between two pictures.

    The input frame interval is the median of the recent captured frames' spacing; a fresh
    picture that comes ``gap`` after the previous one's capture skipped ``gap - interval``
    (0 in passthrough, one frame interval when the model takes every other frame).
    """

    def __init__(self, window: int = 15) -> None:
        self._spacing: deque[float] = deque(maxlen=window)
        self._last_in: float | None = None
        self._last_out: float | None = None

    def captured(self, captured_at: float) -> None:
        """A frame entered the daemon (the ingest thread)."""
        if self._last_in is not None and 0 < captured_at - self._last_in < MAX_GAP_S:
            self._spacing.append(captured_at - self._last_in)
        self._last_in = captured_at

    def shown(self, captured_at: float) -> float:
        """A fresh picture of this capture time went out: the input skipped before it (s)."""
        last, self._last_out = self._last_out, captured_at
        spacing = list(self._spacing)
        if last is None or not spacing or not 0 < captured_at - last < MAX_GAP_S:
            return 0.0
        return max(0.0, captured_at - last - statistics.median(spacing))


#: what :meth:`AudioLine.pull` returns: samples, their time on air, their rate, and the
#: source's coded frames on air within them with their times
Pulled = tuple[np.ndarray, float, int, list[tuple[CodedAudio, float]]]


class AudioLine:
    """A delay line from a source's audio (:meth:`put`) to the sinks (:meth:`pull`).

    It reads the delay from ``tracker`` (fed by the output thread). ``capacity_s`` of input
    is kept (longer than any video delay); ``splice_s`` is the crossfade when the delay
    changes. Thread-safe: ``put`` comes from the source's thread, ``pull`` from the output's.

    The line works in the format of the audio it is given (rate and channels: the source's
    own); it starts in ``rate`` / ``channels`` (silence before any input) and switches when a
    chunk of another format arrives (a new publisher): the output timeline goes on unbroken,
    counted in the new rate, and the old format's unplayed input is dropped.

    ``margin`` is how far behind the wall clock audio is emitted, so that input arriving after its
    video is there when read. Where :meth:`put` is told each chunk's arrival, the line measures how
    late audio arrives and emits it only as far behind as the held delay does not already cover
    (:data:`MIN_MARGIN_S` .. :data:`MAX_MARGIN_S`): with a styled picture's delay the audio leaves
    with its picture, not ``margin`` after it.
    """

    #: the least margin an adaptive line keeps (one output tick at 30 fps), and the most (a
    #: stray late chunk must not hold the sound back for long)
    MIN_MARGIN_S, MAX_MARGIN_S = 0.03, 0.5
    #: added to the latest recent arrival: room for a chunk a little later than those seen
    SPARE_S = 0.02
    #: how many recent chunks' arrival lags the adaptive margin is taken over
    LAG_WINDOW = 100

    def __init__(
        self,
        tracker: DelayTracker,
        *,
        margin: float = 0.1,
        capacity_s: float = 10.0,
        splice_s: float = 0.01,
        rate: int = RATE,
        channels: int = CHANNELS,
    ) -> None:
        self.tracker = tracker
        self.fixed_margin = margin
        self._capacity_s, self._splice_s = capacity_s, splice_s
        self._lock = threading.Lock()
        self._lags: deque[float] = deque(maxlen=self.LAG_WINDOW)
        self._out: int | None = None  # next output sample index (on air at _out / rate)
        #: input samples received; output samples read from missing input (silence); output
        #: samples skipped after a stall longer than MAX_PULL_S (all in the current rate)
        self.received = 0
        self.silent = 0
        self.skipped = 0
        self.rate = rate
        self._reset(rate, channels)
        #: times the input's format changed (a publisher with another rate or layout)
        self.format_changes = 0

    def _reset(self, rate: int, channels: int) -> None:
        """Empty the line for input of ``rate`` Hz, ``channels`` channels; the output
        timeline continues, re-counted in the new rate."""
        scale = rate / self.rate
        if self._out is not None:
            self._out = round(self._out * scale)
        self.received = round(self.received * scale)
        self.silent, self.skipped = round(self.silent * scale), round(self.skipped * scale)
        self.rate, self.channels = rate, channels
        self._cap = int(self._capacity_s * rate)
        self._ring = np.zeros((self._cap, channels), np.float32)
        self._stamp = np.full(self._cap, -1, np.int64)  # absolute index held in each slot
        self._splice = max(1, int(self._splice_s * rate))
        self._next_in: int | None = None
        # the source's coded frames (for sinks that copy them), by capture index, in order
        self._coded: deque[tuple[int, CodedAudio]] = deque()
        self._coded_next: int | None = None
        self._read_delay: int | None = None  # delay in samples the last pull read at
        # the crossfade in progress: the delay it fades from and how many samples are done
        # (a pull shorter than the splice continues it in the next, at the same slope)
        self._fade_from: int | None = None
        self._faded = 0

    @property
    def delay(self) -> float | None:
        """The lasting delay the audio is held back by (seconds), once a frame went out."""
        return self.tracker.delay

    @property
    def margin(self) -> float:
        """How far behind the wall clock the next pull emits (see the class docstring)."""
        with self._lock:
            return self._margin()

    def _margin(self) -> float:
        delay = self.tracker.delay
        if not self._lags or delay is None:
            return self.fixed_margin
        wanted = max(self._lags) + self.SPARE_S - delay
        return min(self.MAX_MARGIN_S, max(self.MIN_MARGIN_S, wanted))

    @property
    def state(self) -> str:
        if self.delay is None:
            return "waiting for the first frame"
        text = f"delay {self.delay * 1000:.0f} ms"
        if off := self.tracker.recent_off_sync:
            text += f", {off:.0%} of frames off sync"
        return text

    def put(self, chunk: AudioChunk, arrival: float | None = None) -> None:
        """Store captured samples at their capture time; ``arrival`` (``time.monotonic()``
        when the chunk came) lets the line adapt its margin."""
        samples = chunk.samples
        n = len(samples)
        if n == 0:
            return
        with self._lock:
            if (chunk.rate, chunk.channels) != (self.rate, self.channels):
                self._reset(chunk.rate, chunk.channels)
                self.format_changes += 1
            if arrival is not None:
                self._lags.append(arrival - chunk.captured_at)
            rate = self.rate
            start = round(chunk.captured_at * rate)
            if self._next_in is not None and abs(start - self._next_in) <= SNAP_S * rate:
                start = self._next_in
            if n > self._cap:
                samples, start, n = samples[-self._cap :], start + n - self._cap, self._cap
            index = np.arange(start, start + n)
            slots = index % self._cap
            self._ring[slots] = samples
            self._stamp[slots] = index
            self._next_in = start + n
            self.received += n

    def put_coded(self, coded: CodedAudio) -> None:
        """Store one of the source's coded frames at its capture time (kept as long as the
        samples; a frame in another rate than the line's is not on its timeline)."""
        with self._lock:
            if coded.rate != self.rate:
                return
            start = round(coded.captured_at * self.rate)
            last = self._coded_next
            if last is not None and abs(start - last) <= SNAP_S * self.rate:
                start = last
            self._coded.append((start, coded))
            self._coded_next = start + coded.samples
            while self._coded[0][0] < start - self._cap:
                self._coded.popleft()

    def pull(self, now: float) -> Pulled | None:
        """The samples due on air up to ``now - margin`` since the last pull, the wall time
        of the first, their rate, and the source's coded frames that go on air within them
        (each with its time on air); ``None`` at the first pull (it starts the timeline) or
        when none are due. Before the first frame's latency is known the output is silence
        (the picture is the slate then): the sound starts with the output, never later."""
        with self._lock:
            rate = self.rate
            end = math.floor((now - self._margin()) * rate)
            delay = self.tracker.delay
            if self._out is None:
                self._out = end
                return None
            if end <= self._out:
                return None
            if end - self._out > MAX_PULL_S * rate:
                self.skipped += end - self._out - int(MAX_PULL_S * rate)
                self._out = end - int(MAX_PULL_S * rate)
            start, n = self._out, end - self._out
            self._out = end
            if delay is None:
                self.silent += n
                return silence(n, self.channels), start / rate, rate, []
            new = round(delay * rate)
            lo, hi = start - new, end - new
            coded = [(c, (i + new) / rate) for i, c in self._coded if lo <= i < hi]
            samples = self._read(start - new, n, count=True)
            if self._read_delay is not None and self._read_delay != new:
                self._fade_from, self._faded = self._read_delay, 0
            if self._fade_from is not None:
                k = min(n, self._splice - self._faded)
                fade = np.arange(self._faded, self._faded + k, dtype=np.float32)[:, None]
                fade /= max(1, self._splice - 1)
                old = self._read(start - self._fade_from, k)
                samples[:k] = old * (1 - fade) + samples[:k] * fade
                self._faded += k
                if self._faded >= self._splice:
                    self._fade_from = None
            self._read_delay = new
        return samples, start / rate, rate, coded

    def _read(self, start: int, n: int, *, count: bool = False) -> np.ndarray:
        index = np.arange(start, start + n)
        slots = index % self._cap
        present = self._stamp[slots] == index
        if count:
            self.silent += n - int(present.sum())
        return np.where(present[:, None], self._ring[slots], np.float32(0))
