"""The sinks of a running daemon: one failure is isolated, re-opened with backoff, and every
sink's own state (with its drop count) reaches the status line."""

from __future__ import annotations

import numpy as np

from broadcast_filter.media.base import Sink
from broadcast_filter.runtime.sink_group import SinkGroup
from broadcast_filter.runtime.watchdog import SafetySettings


class Counting(Sink):
    kind = "counting"

    def __init__(self, fail: bool = False, state: str | None = None) -> None:
        super().__init__(width=8, height=8, fps=10)
        self.sent, self.fail, self.closed = 0, fail, 0
        self.stamps: list[float | None] = []
        if state is not None:
            self.state = state

    def send(self, image: np.ndarray, at: float | None = None) -> None:
        if self.fail:
            raise OSError("unplugged")
        self.sent += 1
        self.stamps.append(at)

    def close(self) -> None:
        self.closed += 1


def test_a_failing_sink_is_closed_the_others_keep_going_and_it_is_reopened_with_backoff():
    logs: list[str] = []
    bad, good, again = Counting(fail=True), Counting(), Counting()
    tries: list[float] = []

    def reopen(name: str) -> Sink:
        tries.append(clock[0])
        if len(tries) < 2:
            raise OSError("still busy")
        return again

    clock = [0.0]
    group = SinkGroup(
        [("bad", bad), ("good", good)], SafetySettings(sink_retry_s=1.0), logs.append, reopen
    )
    image = np.zeros((8, 8, 3), np.uint8)
    group.send(image, 0.0)
    assert good.sent == 1 and bad.closed == 1 and group.failed == {"bad": "unplugged"}
    assert group.state() == "bad failed" and not group.dead
    group.retry(0.5, lambda: clock[0])  # not due yet
    assert tries == []
    clock[0] = 1.0
    group.retry(1.0, lambda: clock[0])  # first try fails: next in 2 s
    assert "next try in 2 s" in logs[-1]
    clock[0] = 2.5
    group.retry(2.5, lambda: clock[0])
    assert tries == [1.0]
    clock[0] = 3.0
    group.retry(3.0, lambda: clock[0])
    assert tries == [1.0, 3.0] and group.failed == {} and "re-opened after 2 attempt(s)" in logs[-1]
    group.send(image, 3.1)
    assert again.sent == 1 and good.sent == 2


def test_every_sink_stamps_a_picture_with_the_one_time_it_goes_on_air():
    first, second = Counting(), Counting()
    group = SinkGroup([("a", first), ("b", second)], SafetySettings(), print)
    image = np.zeros((8, 8, 3), np.uint8)
    group.send(image, 12.5)
    group.send(image, 12.6)
    assert first.stamps == second.stamps == [12.5, 12.6]


def test_network_sinks_show_their_state_and_drops_on_the_status_line():
    group = SinkGroup(
        [("out.mp4", Counting()), ("rtmp://h/live/****", Counting(state="live, 3 dropped"))],
        SafetySettings(),
        print,
    )
    assert group.state() == "rtmp://h/live/**** live, 3 dropped"
    assert SinkGroup([("out.mp4", Counting())], SafetySettings(), print).state() is None
    assert SinkGroup([], SafetySettings(), print).dead  # nothing left and nothing to re-open
