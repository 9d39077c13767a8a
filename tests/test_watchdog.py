"""On-air safety: the watchdog's pure decisions, the slate, sink re-opening, and the output
running on while the engine is blocked inside a call."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_daemon import RecordingSink, SlowEngine, make_daemon

from broadcast_filter.runtime.daemon import Limits
from broadcast_filter.runtime.engine import EngineError
from broadcast_filter.runtime.slate import blend, fit_image, no_signal_slate
from broadcast_filter.runtime.watchdog import (
    SafetySettings,
    WatchState,
    classify,
    engine_finished,
    engine_started,
    on_air,
)

POLICY = SafetySettings(stall_s=0.5, restart_after=3, recover_after=2, fade_s=1.0, hold_s=2.0)


def air(state: WatchState, now: float, *, age: float = 0.0, lost: bool = False):
    return on_air(state, now, POLICY, input_age=age, source_lost=lost)


# ------------------------------------------------------------------ pure decisions


def test_a_failed_call_passes_through_at_once_and_good_calls_fade_back():
    s = engine_finished(engine_started(WatchState(), 0.0), 0.1, "engine output NaN/inf", POLICY)
    s, pick = air(s, 0.2)
    assert pick.kind == "pass" and "NaN" in pick.reason and s.switches == 1
    s = engine_finished(s, 0.3, None, POLICY)
    assert air(s, 0.35)[1].kind == "pass"  # one good call is not enough
    s = engine_finished(s, 0.4, None, POLICY)
    s, pick = air(s, 0.9)
    assert pick.kind == "fade" and pick.weight == pytest.approx(0.5)
    s, pick = air(s, 1.5)
    assert pick.kind == "engine" and s.switches == 2  # fade -> engine is not a new switch


def test_a_call_longer_than_the_budget_is_a_stall_even_before_it_returns():
    s = engine_started(WatchState(), 10.0)
    assert air(s, 10.4)[1].kind == "engine"
    s, pick = air(s, 10.6)
    assert pick.kind == "pass" and "stalled" in pick.reason and s.faults == 1
    s, _ = air(s, 12.0)
    assert s.faults == 1  # one stall counts once, however long it lasts


def test_failures_in_a_row_ask_for_one_restart_then_count_again():
    s = WatchState()
    asks = []
    for i in range(7):
        s = engine_finished(s, i, "engine error: RuntimeError", POLICY)
        asks.append(s.restart)
        s = replace(s, restart=False)
    assert asks == [False, False, True, False, False, True, False]
    assert s.restarts == 2


def test_source_loss_holds_then_shows_the_slate_then_returns():
    s, pick = air(WatchState(), 1.0, age=0.5, lost=True)
    assert pick.kind == "hold"
    s, pick = air(s, 3.0, age=2.5, lost=True)
    assert pick.kind == "slate" and pick.reason == "no signal: source lost"
    assert air(s, 4.0, age=2.5, lost=False)[1].reason == "no signal: no input for 2 s"
    s, pick = air(s, 5.0, age=0.0, lost=False)
    assert pick.kind == "engine" and s.switches == 3  # engine -> hold -> slate -> engine


def test_out_of_memory_and_nan_are_told_apart_from_other_errors():
    oom = EngineError("model step failed")
    oom.__cause__ = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert classify(oom) == "engine out of memory"
    assert classify(MemoryError()) == "engine out of memory"
    assert classify(EngineError("model produced non-finite values (NaN/inf)")).endswith("NaN/inf")
    assert classify(ValueError("x")) == "engine error: ValueError"


def test_slate_says_no_signal_and_images_scale_and_blend():
    slate = no_signal_slate(160, 96, "source lost")
    assert slate.shape == (96, 160, 3) and slate.dtype == np.uint8
    assert (slate > 200).any() and slate.std() > 10  # text and colour bars, not a flat frame
    assert no_signal_slate(160, 96, "source lost") is slate  # made once
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert fit_image(image, 8, 2).shape == (2, 8, 3) and fit_image(image, 4, 4) is image
    black, white = np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8)
    assert blend(black, white, 0.25).max() == 64 and blend(black, white, 1.0) is white


# ------------------------------------------------------------------ threads


class BlockingEngine(SlowEngine):
    """Blocks inside one call for ``block`` seconds (a hung driver call). A fake: no real
    model can be made to hang on demand; the test is about the output thread."""

    def __init__(self, block: float, at_call: int = 10) -> None:
        super().__init__(0.01)
        self.block, self.at_call, self.blocked = block, at_call, threading.Event()
        self.blocked_span = (0.0, 0.0)  # monotonic start and end of the block

    def process(self, image: np.ndarray, now: float) -> tuple[np.ndarray, bool]:
        if self.calls == self.at_call and not self.blocked.is_set():
            self.blocked.set()
            start = time.monotonic()
            time.sleep(self.block)
            self.blocked_span = (start, time.monotonic())
        return super().process(image, now)


def test_output_keeps_sending_live_passthrough_while_the_engine_is_blocked_for_seconds():
    sink = RecordingSink()
    frames: list[np.ndarray] = []
    send = sink.send
    sink.send = lambda image, at=None: (send(image, at), frames.append(image.copy()))  # type: ignore[method-assign]
    safety = SafetySettings(stall_s=0.3, recover_after=2, fade_s=0.3)
    daemon = make_daemon([("rec", sink)], cost=0.01, fps=20, limits=Limits(frames=120))
    daemon.controller.engine = engine = BlockingEngine(block=3.0)
    daemon.safety = safety
    daemon.watchdog.policy = safety
    assert daemon.run() == 0
    assert engine.blocked.is_set() and len(sink.times) == 120
    # the output did not wait for the engine: it went on sending through the block (at
    # least half its 20 fps: a busy machine may delay single ticks, not stop the thread)
    start, end = engine.blocked_span
    during = sum(start < t < end for t in sink.times)
    assert during >= (end - start) * 20 / 2, (during, end - start)
    lines = "".join(daemon.status.stream.lines)
    assert "on air: pass (passthrough: engine stalled (one call > 0.3 s))" in lines
    assert "on air: fade (engine recovered)" in lines
    # while blocked the output showed the live input, not a frozen frame: ~60 new pictures
    distinct = {f.tobytes() for f in frames}
    assert len(distinct) > 60
    assert daemon.stats()["mode_switches"] >= 2 and daemon.stats()["on_air"] == "engine"


class FailingSink(RecordingSink):
    """A local sink (virtual camera taken, disk full) that fails, then works when re-opened."""

    def send(self, image: np.ndarray, at: float | None = None) -> None:
        if len(self.times) == 5:
            self.times.append(0.0)
            raise OSError(28, "No space left on device")
        super().send(image, at)


def test_a_failed_local_sink_is_reopened_with_backoff_and_the_others_never_stop():
    bad, good = FailingSink(), RecordingSink()
    attempts: list[float] = []

    def reopen(name: str) -> RecordingSink:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise OSError("device busy")
        return replacement

    replacement = RecordingSink()
    daemon = make_daemon([("bad", bad), ("good", good)], cost=0.01, limits=Limits(frames=80))
    daemon.sinks.reopen = reopen
    daemon.sinks.safety = replace(daemon.safety, sink_retry_s=0.2, sink_retry_max_s=1.0)
    assert daemon.run() == 0
    assert len(good.times) == 80 and bad.closed == 1
    assert len(attempts) == 3 and len(replacement.times) > 10
    assert attempts[2] - attempts[1] > 1.4 * (attempts[1] - attempts[0])  # backing off
    assert daemon.stats()["failed_sinks"] == {}
    lines = "".join(daemon.status.stream.lines)
    assert "re-opening in 0.2 s" in lines and "re-open failed" in lines
    assert "sink bad re-opened after 3 attempt(s)" in lines


def test_an_unexpected_exception_in_the_engine_thread_never_stops_the_output():
    class Buggy(SlowEngine):
        def process(self, image, now):
            if 5 <= self.calls < 40:
                self.calls += 1
                raise ZeroDivisionError("bug")
            return super().process(image, now)

    sink = RecordingSink()
    daemon = make_daemon([("rec", sink)], cost=0.01, limits=Limits(frames=60))
    daemon.controller.engine = Buggy(0.01)
    assert daemon.run() == 0 and daemon.failure is None
    assert len(sink.times) == 60
    lines = "".join(daemon.status.stream.lines)
    assert "engine thread: ZeroDivisionError('bug'); passing frames through" in lines
    assert "restarting the engine (5 failures: engine error: ZeroDivisionError)" in lines
