"""The lasting video delay and the audio delay line, on simulated time (``now`` is passed in).

Input audio is a function of the absolute sample index (capture time x RATE), so every
output sample can be checked against the exact input sample it must carry.
"""

from __future__ import annotations

import numpy as np
import pytest

from broadcast_filter.media.audio import RATE, AudioChunk, CodedAudio
from broadcast_filter.runtime.av_sync import SNAP_S, AudioLine, DelayTracker, SkippedInput

T0 = 1000.0  # a monotonic time far from zero, as on a running machine
CHUNK = 1024  # an AAC frame


def noise(index: np.ndarray) -> np.ndarray:
    """A distinct, exactly representable float32 value per absolute index (two channels)."""
    left = ((index * 2654435761) % 65536).astype(np.float32) / 65536 - np.float32(0.5)
    return np.stack([left, -left], axis=1)


def sine(index: np.ndarray, hz: float = 100.0, amplitude: float = 0.5) -> np.ndarray:
    left = (amplitude * np.sin(2 * np.pi * hz * index / RATE)).astype(np.float32)
    return np.stack([left, left], axis=1)


def chunk(start: int, n: int = CHUNK, signal=noise, jitter: float = 0.0) -> AudioChunk:
    """Input samples ``start .. start + n`` stamped at their capture time (plus ``jitter`` s)."""
    return AudioChunk(signal(np.arange(start, start + n)), start / RATE + jitter)


def tracker_at(delay: float, fps: float = 30) -> DelayTracker:
    """A tracker holding ``delay``: the line only reads it (the tracker's own rules are
    tested on their own below)."""
    tracker = DelayTracker(fps)
    tracker.delay = delay
    return tracker


class Run:
    """Feeds a line with input captured up to ``now`` and pulls its output, in order."""

    def __init__(self, line: AudioLine, signal=noise, start: float = T0) -> None:
        self.line, self.signal = line, signal
        self.next_in = round(start * RATE)
        self.out: list[tuple[int, np.ndarray]] = []  # (first output index, samples)

    def feed(self, now: float, *, missing: tuple[float, float] | None = None) -> None:
        """Put every whole chunk captured by ``now`` (none captured within ``missing``)."""
        while (self.next_in + CHUNK) / RATE <= now:
            at = self.next_in / RATE
            if missing is None or not missing[0] <= at < missing[1]:
                self.line.put(chunk(self.next_in, signal=self.signal))
            self.next_in += CHUNK

    def pull(self, now: float, *, keep: bool = True) -> tuple[int, np.ndarray] | None:
        """One pull, checked to follow the previous; kept for :meth:`output` (or only the
        last, to bound memory)."""
        if (due := self.line.pull(now)) is None:
            return None
        samples, at, rate, _ = due
        assert rate == RATE
        start = round(at * RATE)
        assert start == pytest.approx(at * RATE, abs=1e-3)  # on the sample grid
        if self.out:  # contiguous with the previous pull
            last, previous = self.out[-1]
            assert start == last + len(previous)
        self.out = [*self.out, (start, samples)] if keep else [(start, samples)]
        return start, samples

    def output(self) -> tuple[np.ndarray, np.ndarray]:
        """Output sample indices and samples of every pull so far."""
        first = self.out[0][0]
        samples = np.concatenate([s for _, s in self.out])
        return np.arange(first, first + len(samples)), samples


def test_output_count_follows_the_wall_clock_and_carries_the_delayed_input():
    rng = np.random.default_rng(1)
    line = AudioLine(tracker_at(0.2))
    run = Run(line)
    delay, captured_from = round(0.2 * RATE), round(T0 * RATE)
    now = T0
    first_pull = None
    emitted = missing = 0
    while now < T0 + 600:  # ten minutes of irregular output ticks
        now += rng.uniform(0.001, 0.08)
        run.feed(now)
        pulled = run.pull(now, keep=False)
        first_pull = now if first_pull is None else first_pull
        if pulled is None:
            continue
        start, samples = pulled
        # each output sample is the input sample captured exactly one delay earlier
        source = np.arange(start, start + len(samples)) - delay
        captured = source >= captured_from
        np.testing.assert_array_equal(samples[captured], noise(source[captured]))
        assert not samples[~captured].any()
        emitted += len(samples)
        missing += int((~captured).sum())
    # no drift: everything between the first pull and the last, within the flooring of both
    assert first_pull is not None and abs(emitted - (now - first_pull) * RATE) <= 1
    assert 0 < missing < 0.3 * RATE  # the line started before any input was captured
    assert line.silent == missing and line.skipped == 0


def test_before_the_first_frame_the_line_emits_silence_on_the_same_timeline():
    """No frame has gone out yet (no delay known: the slate is on air): the sound is silence
    from the first pull on, counted, and the input is read, one delay back, as soon as the
    first frame's latency is known, on the same contiguous timeline."""
    tracker = DelayTracker(30)
    line = AudioLine(tracker)
    run = Run(line)
    now = T0 + 1.0
    run.feed(now)
    assert run.pull(now) is None  # the first pull starts the timeline
    for _ in range(10):
        now += 0.05
        run.feed(now)
        run.pull(now)
    _, before = run.output()
    assert abs(len(before) - 0.5 * RATE) <= 1 and not before.any()  # floored ticks
    assert line.silent == len(before)
    tracker.observe(0.1)
    now += 0.05
    run.feed(now)
    start, samples = run.pull(now)
    source = np.arange(start, start + len(samples)) - round(tracker.delay * RATE)
    np.testing.assert_array_equal(samples, noise(source))
    assert line.silent == len(before)


def test_missing_input_is_silence_and_counted():
    line = AudioLine(tracker_at(0.1))
    run = Run(line)
    now = T0
    while now < T0 + 5:
        now += 0.02
        run.feed(now, missing=(T0 + 2, T0 + 3))
        run.pull(now)
    index, samples = run.output()
    source = index - round(0.1 * RATE)
    chunk_at = (source - round(T0 * RATE)) // CHUNK * CHUNK + round(T0 * RATE)
    lost = (source < round(T0 * RATE)) | (
        (chunk_at >= (T0 + 2) * RATE) & (chunk_at < (T0 + 3) * RATE)
    )
    assert lost.sum() > RATE * 0.99  # the second that was never captured went out as silence
    assert not samples[lost].any()
    np.testing.assert_array_equal(samples[~lost], noise(source[~lost]))
    assert line.silent == int(lost.sum())


@pytest.mark.parametrize("tick", [0.033, 0.002], ids=["30fps", "2ms"])
def test_a_delay_change_is_one_crossfaded_splice(tick):
    """The read position jumps once, from the old delay to the new, through a crossfade as
    long as ``splice_s`` whatever the pull sizes. A 100 Hz sine with a jump that is no whole
    number of periods: a hard splice would step by ~0.8; the crossfade may step by no more
    than the sine's own largest step plus the fade's (2 x amplitude over the splice)."""
    old, new = 0.2, 0.2371  # 9600 -> 11381 samples: 3.71 periods further back
    tracker = tracker_at(old)
    line = AudioLine(tracker, splice_s=0.01)
    run = Run(line, signal=sine)
    now = T0
    changed_at = None
    while now < T0 + 3:
        now += tick
        run.feed(now)
        if now >= T0 + 1.5 and changed_at is None:
            tracker.delay = new  # a lasting change
            changed_at = run.out[-1][0] + len(run.out[-1][1])  # first sample read at `new`
        run.pull(now)
    index, samples = run.output()
    splice = round(0.01 * RATE)
    before = (index < changed_at) & (index - round(old * RATE) >= round(T0 * RATE))
    after = index >= changed_at + splice
    d_old, d_new = round(old * RATE), round(new * RATE)
    np.testing.assert_array_equal(samples[before], sine(index[before] - d_old))
    np.testing.assert_array_equal(samples[after], sine(index[after] - d_new))  # read at `new`
    # one splice, `splice` samples long: from the old read position to the new
    fade = (index >= changed_at) & ~after
    assert fade.sum() == splice
    assert samples[fade][0] == pytest.approx(sine(index[fade][:1] - d_old)[0])
    assert samples[fade][-1] == pytest.approx(sine(index[fade][-1:] - d_new)[0])
    window = (index >= changed_at - 100) & (index < changed_at + splice + 100)
    steps = np.abs(np.diff(samples[window, 0]))
    own = np.abs(np.diff(sine(np.arange(RATE))[:, 0])).max()
    hard = np.abs(
        sine(np.array([changed_at - d_new]))[0, 0] - sine(np.array([changed_at - d_old]))[0, 0]
    )
    assert hard > 10 * own  # the splice is where a click would be
    assert steps.max() <= own + 2 * 0.5 / (splice - 1) + 1e-6, (steps.max(), own)
    assert line.silent == int((index - d_old < round(T0 * RATE)).sum())


def test_delay_tracker_ignores_outliers_and_jitter_and_follows_a_lasting_change():
    """The delay covers the most recent latencies with the sync window (a stray frame does
    not move it), a steady latency at the window's middle, and moves only by more than the
    tolerance."""
    rng = np.random.default_rng(2)
    bias = DelayTracker.CENTRE_S

    def jittered(base: float) -> float:
        return base + rng.uniform(-0.012, 0.012)

    tracker = DelayTracker(30)  # tolerance: one frame interval, at most 30 ms
    assert tracker.tolerance == pytest.approx(0.03)
    assert tracker.observe(0.15)  # the first latency is the first delay
    assert tracker.delay == pytest.approx(0.15 + bias)
    for _ in range(14):  # the first window: it follows freely
        tracker.observe(jittered(0.15))
    settled = tracker.delay
    assert settled == pytest.approx(0.15 + bias, abs=0.012)
    for _ in range(50):  # +-12 ms of jitter is within the tolerance
        assert not tracker.observe(jittered(0.15))
    assert tracker.delay == settled and tracker.changes == 0
    for spike in (0.9, 0.0, 0.5):  # single late/early frames, a window apart
        assert not tracker.observe(spike)
        for _ in range(15):
            assert not tracker.observe(jittered(0.15))
    assert tracker.delay == settled and tracker.changes == 0
    changed = [tracker.observe(jittered(0.30)) for _ in range(15)]
    print(f"changed at {[i for i, c in enumerate(changed) if c]}")
    assert 1 <= changed.count(True) <= 3 and changed.index(True) <= 8  # once most are new
    assert tracker.delay == pytest.approx(0.30 + bias, abs=0.012)
    assert tracker.changes == changed.count(True)
    assert DelayTracker(60).tolerance == pytest.approx(1 / 60)


def test_delay_tracker_aims_at_the_middle_of_a_spread():
    """Frames that wait 0 or 1 output tick (passthrough at the input's rate): the delay sits
    between the two, so both are within broadcast tolerance (-40 ms .. +60 ms)."""
    tracker = DelayTracker(15)
    for i in range(30):
        tracker.observe(0.010 if i % 2 else 0.010 + 1 / 15)
    offsets = [tracker.delay - latency for latency in (0.010, 0.010 + 1 / 15)]
    assert all(-0.040 <= o <= 0.060 for o in offsets), offsets
    # a frame replaced before its tick (skipped) and the next one shown at once: an event in
    # the skipped one shows up as late as a frame that waited a whole tick, no later
    settled = tracker.delay
    for i in range(30):
        if i % 3 == 0:
            tracker.observe(0.010, skipped=1 / 15)
        else:
            tracker.observe(0.010 if i % 2 else 0.010 + 1 / 15)
    assert tracker.delay == pytest.approx(settled)


def test_jittered_stamps_are_placed_contiguously():
    rng = np.random.default_rng(3)
    line = AudioLine(tracker_at(0.1))
    start = round(T0 * RATE)
    line.put(chunk(start))  # the first chunk sets where the stream sits
    for i in range(1, 81):
        line.put(chunk(start + i * CHUNK, jitter=rng.uniform(-0.95, 0.95) * SNAP_S))
    assert line.received == 81 * CHUNK
    # output starts where the first input sample is due (times mid-sample: floor is exact)
    line.pull((start + round(0.1 * RATE) + 0.5) / RATE + line.margin)
    samples, at, _, _ = line.pull(
        (start + round(0.1 * RATE) + 80 * CHUNK + 0.5) / RATE + line.margin
    )
    assert round(at * RATE) == start + round(0.1 * RATE)
    np.testing.assert_array_equal(samples, noise(np.arange(start, start + 80 * CHUNK)))
    assert line.silent == 0


def test_a_stamp_further_off_than_the_snap_is_taken_as_it_is():
    line = AudioLine(tracker_at(0.0), margin=0.0)
    start = round(T0 * RATE)
    line.put(chunk(start))
    late = round(0.01 * RATE)  # 10 ms: a real gap in the input, not jitter
    line.put(chunk(start + CHUNK, jitter=late / RATE))
    line.pull((start + 0.5) / RATE)
    samples, _, _, _ = line.pull((start + 2 * CHUNK + late + 0.5) / RATE)
    assert line.silent == late and not samples[CHUNK : CHUNK + late].any()
    np.testing.assert_array_equal(
        samples[CHUNK + late :], noise(np.arange(start + CHUNK, start + 2 * CHUNK))
    )


def test_a_model_slower_than_the_input_moves_the_delay_by_half_what_it_skips():
    """Input at 15 fps, the model takes every other frame: an event in the skipped frame
    shows up a frame late, in the taken one on time, so the delay sits half a frame later
    than the frames' own latency and the two cases are early and late by the same amount."""
    f = 1 / 15
    skipped = SkippedInput()
    tracker = DelayTracker(15)
    latency = 0.120
    for i in range(60):
        skipped.captured(T0 + i * f)
        if i % 2 == 0:  # the model takes frames 0, 2, 4 ...
            gap = skipped.shown(T0 + i * f)
            assert gap == (0.0 if i == 0 else pytest.approx(f))
            tracker.observe(latency, gap)
    assert tracker.delay == pytest.approx(latency + f / 2 + DelayTracker.CENTRE_S)
    # an event at a taken frame: audio late by f/2 (+ bias); at a skipped one: early by f/2
    late, early = tracker.delay - latency, tracker.delay - (latency + f)
    assert late == pytest.approx(f / 2 + DelayTracker.CENTRE_S)
    assert early == pytest.approx(-f / 2 + DelayTracker.CENTRE_S)
    # passthrough: every frame taken, nothing skipped; a break (lost source) is not a gap
    for i in (60, 61):
        skipped.captured(T0 + i * f)
    skipped.shown(T0 + 60 * f)
    assert skipped.shown(T0 + 61 * f) == pytest.approx(0.0, abs=1e-9)
    assert skipped.shown(T0 + 61 * f + 5.0) == 0.0


def test_frames_the_delay_cannot_cover_are_counted_off_sync():
    """A steady latency is never off sync; on a machine where the latency spreads wider than
    broadcast tolerance (-40 .. +60 ms around the delay) the frames outside it are counted,
    with the events a skipped span may hold, and the status says what share of the recent
    ones are."""
    tracker = DelayTracker(15)
    line = AudioLine(tracker)
    for _ in range(30):
        tracker.observe(0.100)
    assert (tracker.frames, tracker.off_sync, tracker.recent_off_sync) == (30, 0, 0.0)
    assert line.state == "delay 110 ms"
    # within tolerance: 60 ms faster than the delay (audio 60 ms late), 40 ms slower
    tracker.observe(tracker.delay - 0.059)
    tracker.observe(tracker.delay + 0.039)
    assert tracker.off_sync == 0
    # past it: a frame 70 ms fast, one 50 ms slow, one on time whose skipped span reaches
    # 50 ms beyond the delay (an event in the skipped input shows that late)
    delay = tracker.delay
    tracker.observe(delay - 0.070)
    tracker.observe(delay + 0.050)
    tracker.observe(delay, skipped=0.050)
    assert tracker.delay == delay and tracker.off_sync == 3 and tracker.frames == 35
    assert tracker.recent_off_sync == pytest.approx(3 / 15)
    assert line.state == "delay 110 ms, 20% of frames off sync"


def test_a_publisher_in_another_format_switches_the_line_without_breaking_the_timeline():
    """48 kHz stereo, then a source of 44.1 kHz mono (a new publisher): the output goes on
    in the new format from where it was (no gap, no overlap on the wall clock), carries the
    new input one delay back, exactly, and the counters follow the new rate."""
    line = AudioLine(tracker_at(0.1), margin=0.0)
    run = Run(line)
    now = T0 + 1.0
    run.feed(now)
    line.pull(now)
    for _ in range(10):
        now += 0.05
        run.feed(now)
        samples, at, rate, _ = line.pull(now)
    assert rate == RATE and samples.shape[1] == 2
    end = at + len(samples) / RATE
    mono = 44_100
    first = round(now * mono)
    index = np.arange(first, first + 2 * mono)  # two seconds captured from now on
    signal = noise(index)[:, :1]
    for i in range(0, len(index), 1024):
        line.put(AudioChunk(signal[i : i + 1024], index[i] / mono, mono))
    assert line.format_changes == 1 and (line.rate, line.channels) == (mono, 1)
    samples, at, rate, _ = line.pull(now + 1.0)
    assert rate == mono and samples.shape[1] == 1
    assert abs(len(samples) - (now + 1.0 - end) * mono) <= 1
    assert abs(at - end) <= 1 / mono  # the timeline goes on where it was
    source = np.arange(round(at * mono), round(at * mono) + len(samples)) - round(0.1 * mono)
    captured = source >= first
    np.testing.assert_array_equal(samples[captured], signal[source[captured] - first])
    assert not samples[~captured].any()  # the old format's tail is not played in the new one
    assert 0.09 * mono <= (~captured).sum() <= 0.11 * mono


def test_the_margin_follows_how_late_audio_arrives_beyond_the_delay():
    """Audio arriving 40 ms after capture, a held delay of 200 ms: the audio is already there
    when its time on air comes, so it goes out with the least margin; with a delay of 10 ms
    it must wait for the audio: 40 ms + the spare - 10 ms. Without arrivals: the fixed one."""
    tracker = tracker_at(0.2)
    line = AudioLine(tracker)
    assert line.margin == line.fixed_margin
    for i in range(10):
        line.put(chunk(round(T0 * RATE) + i * CHUNK), arrival=T0 + (i + 1) * CHUNK / RATE + 0.04)
    assert line.margin == pytest.approx(AudioLine.MIN_MARGIN_S)
    tracker.delay = 0.01
    lag = CHUNK / RATE + 0.04  # the first sample of a chunk waited the longest
    assert line.margin == pytest.approx(lag + AudioLine.SPARE_S - 0.01)
    # what that margin promises: every sample due on air was there when it was read
    run = Run(AudioLine(tracker), start=T0)
    now = T0
    for _ in range(200):
        now += 1 / 30
        while (run.next_in + CHUNK) / RATE + 0.04 <= now:  # a chunk arrives 40 ms late
            start = run.next_in
            run.line.put(chunk(start), arrival=(start + CHUNK) / RATE + 0.04)
            run.next_in += CHUNK
        run.pull(now)
    index, samples = run.output()
    source = index - round(0.01 * RATE)
    captured = source >= round(T0 * RATE)
    np.testing.assert_array_equal(samples[captured], noise(source[captured]))
    assert run.line.silent == (~captured).sum()  # silence only before the first capture


def test_coded_frames_leave_with_their_samples_one_delay_later():
    """The source's AAC frames (for sinks that copy them) come out of the pull whose span
    holds their time on air, capture time + the held delay, each once while the delay holds;
    a frame in another rate than the line's is not on its timeline."""
    line = AudioLine(tracker_at(0.2), margin=0.0)
    start = round(T0 * RATE)
    for i in range(50):
        at = (start + i * CHUNK) / RATE
        line.put(chunk(start + i * CHUNK))
        line.put_coded(CodedAudio(bytes([i]), at + (i % 3 - 1) * 0.001, CHUNK, RATE, 2))
    line.put_coded(CodedAudio(b"x", T0, CHUNK, 44_100, 2))  # not on this timeline
    line.pull(T0 + 0.19)  # the timeline starts before the first frame goes on air
    got = []
    now = T0 + 0.19
    while now < T0 + 0.2 + 50 * CHUNK / RATE:
        now += 0.033
        samples, at, rate, coded = line.pull(now)
        end = at + len(samples) / rate
        assert all(at - 1e-9 <= on_air < end for _, on_air in coded)
        got += coded
    assert [c.data for c, _ in got] == [bytes([i]) for i in range(50)]
    first = got[0][1]
    assert first == pytest.approx((start / RATE) + 0.2 - 0.001, abs=1 / RATE)
    for coded, on_air in got:  # jittered stamps snap onto the run the first one began
        assert on_air == pytest.approx(first + coded.data[0] * CHUNK / RATE, abs=1 / RATE)
