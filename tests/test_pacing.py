"""Output pacing: a fixed grid at the target rate, catch-up and skip after stalls."""

from __future__ import annotations

import numpy as np
import pytest

from broadcast_filter.runtime.pacing import PaceState, pace


def run_clock(state: PaceState, now: float, work: float, ticks: int) -> tuple[PaceState, list]:
    """Simulate the output thread: sleep what pace says, then spend ``work`` sending."""
    sent = []
    for _ in range(ticks):
        state, delay = pace(state, now)
        now += delay
        sent.append(now)
        now += work
    return state, sent


def test_pacing_keeps_a_fixed_grid_at_the_target_rate():
    state, sent = run_clock(PaceState.at_fps(30), now=100.0, work=0.004, ticks=90)
    gaps = np.diff(sent)
    assert gaps == pytest.approx(np.full(89, 1 / 30))
    assert state.emitted == 90 and state.missed == 0


def test_pacing_catches_up_a_short_delay_without_losing_frames():
    state, delay = pace(PaceState.at_fps(10), 0.0)
    state, delay = pace(state, 0.15)  # due at 0.1, 0.05 late: send at once
    assert delay == 0.0 and state.next_due == pytest.approx(0.2)
    state, delay = pace(state, 0.16)
    assert delay == pytest.approx(0.04) and state.missed == 0


def test_pacing_skips_ticks_after_a_long_stall_instead_of_bursting():
    state, _ = pace(PaceState.at_fps(10), 0.0)
    state, delay = pace(state, 1.05)  # due at 0.1; ~9.5 periods late
    assert state.missed == 9 and delay == 0.0
    state, delay = pace(state, 1.06)
    assert delay == pytest.approx(0.04)  # back on the grid: 1.1


def test_pacing_count_matches_elapsed_time_with_a_slow_sink():
    # Sink takes 1.5 periods per frame: the rate drops, the grid re-anchors, nothing bursts.
    state, sent = run_clock(PaceState.at_fps(20), now=0.0, work=0.075, ticks=40)
    gaps = np.diff(sent)
    assert gaps.min() >= 0.075 - 1e-9
    assert state.emitted == 40
