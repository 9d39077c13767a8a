"""The matcher that finds which emitted flashes a recording holds (tests/emitted.py).

The inputs are shaped as CI met them: flashes every 2 s on the publisher's clock, sent at
15 fps frame boundaries (so the spacing is off by a frame here and there) with a ms or so
of send-time jitter, and a recording whose time 0 is about a second before the first one.
"""

import pytest
from emitted import match

FRAME = 1 / 15
#: the spacing of the flashes in the CI failure: mostly 2 s, a frame or two off at places
SPACING = [2 + FRAME, 2 - FRAME, 2, 2, 2 - 2 * FRAME, 2, 2, 2, 2, 2, 2]
#: send-time jitter, s (a daemon on a loaded CPU): with it, a run shifted by one flash had
#: the smaller median misfit, which is how the old matcher got CI's nginx recording wrong
JITTER = [-13e-4, 6e-4, -7e-4, -12e-4, 0, 0, -1e-4, -2e-4, -9e-4, -10e-4, 8e-4, -7e-4]
FIRST = 5139.75  # the daemon's monotonic time of the first flash


def frame_times() -> list[float]:
    """When the flashes' frames are due, on the daemon's clock."""
    times = [FIRST]
    for gap in SPACING:
        times.append(times[-1] + gap)
    return times


def emitted_flashes() -> list[tuple[float, float]]:
    """(sent at, offset): sent a little off the frame's time; the offset numbers the
    flashes (i ms for the i-th)."""
    return [(t + j, i / 1000) for i, (t, j) in enumerate(zip(frame_times(), JITTER, strict=True))]


def recording(emitted, starts: float, late: int | None = None) -> list[tuple[float, float]]:
    """The flashes a recording that starts ``starts`` after the first flash holds, at their
    frames' times in it (ms, as FLV rounds them); flash ``late`` shown a frame late (its
    sink dropped a frame under load)."""
    recorded = [
        (round(t - FIRST - starts, 3), o)
        for t, (_, o) in zip(frame_times(), emitted, strict=True)
        if t - FIRST - starts > 0
    ]
    if late is not None:
        t, o = recorded[late]
        recorded[late] = (t + FRAME, o)
    return recorded


def test_a_run_shifted_by_one_flash_is_not_taken_for_the_true_one():
    emitted = emitted_flashes()
    recorded = recording(emitted, -1.08)[:11]  # the recorder stopped before the last flash
    assert match(recorded, emitted, FIRST - 1.08) == [(o, o) for _, o in recorded]


def test_one_flash_a_frame_late_keeps_the_rest_matched():
    emitted = emitted_flashes()
    recorded = recording(emitted, -1.08, late=0)
    assert match(recorded, emitted, FIRST - 1.08) == [(o, o) for _, o in recorded]


def test_a_recording_that_missed_the_first_flashes_is_matched_to_the_later_ones():
    emitted = emitted_flashes()
    recorded = recording(emitted, 3.0)  # starts a second after the second flash
    assert [e for _, e in match(recorded, emitted, FIRST + 3.0)] == [o for _, o in emitted[2:]]


def test_an_even_spacing_is_matched_nearest_to_where_the_recording_started():
    emitted = [(100.0 + 2 * i, i / 1000) for i in range(8)]
    recorded = [(0.5 + 2 * i, 0.0) for i in range(5)]
    # the recording began 0.5 s before the flash the daemon sent at 106 s
    assert [e for _, e in match(recorded, emitted, 105.6)] == [o for _, o in emitted[3:]]


def test_an_even_spacing_is_matched_by_the_offsets_where_the_start_time_is_far_off():
    # passthrough: even spacing, the first pair emitted before the delay settled (+40 ms);
    # the recording holds the rest (CI's shape). Its time 0 is 201.7 s on the daemon's clock,
    # but the recorder was slow to start on a loaded machine: the test's guess is 1.5 s early
    offsets = [0.040, 0.018, 0.021, 0.020, 0.021, 0.021, 0.020]
    emitted = [(200.0 + 2 * i, o) for i, o in enumerate(offsets)]
    recorded = [(0.3 + 2 * i, o) for i, o in enumerate(offsets[1:])]
    zero_at = 201.7 - 1.5
    assert match(recorded, emitted, zero_at) == [(o, o) for o in offsets[1:]]


def test_flashes_that_are_no_run_of_the_sent_ones_are_refused():
    emitted = [(100.0 + 2 * i, 0.0) for i in range(8)]
    recorded = [(t, 0.0) for t in (1.0, 2.3, 5.9, 6.2)]
    with pytest.raises(AssertionError, match="no run of the sent ones"):
        match(recorded, emitted, 99.0)
