"""Telemetry: rate meter, latency ring and the status line."""

from __future__ import annotations

import math

import pytest

from broadcast_filter.runtime.telemetry import RateMeter, Ring, StatusLine, Telemetry, format_status


def test_rate_meter_and_latency_ring():
    meter = RateMeter(capacity=64)
    for i in range(61):
        meter.add(i / 30)
    assert meter.rate(2.0) == pytest.approx(30, rel=0.05)
    assert meter.rate(10.0) == 0.0  # stopped: decays to zero
    ring = Ring(capacity=4)
    assert math.isnan(ring.percentile(50))
    for v in (5, 1, 2, 3, 4):  # 5 falls out of the ring
        ring.add(v)
    assert ring.percentile(50) == pytest.approx(2.5)


def test_status_line_shows_preset_mode_rates_latency_drops_and_skips():
    t = Telemetry(target_fps=30)
    t.set_state(preset="anime", mode="styled", bypass=False)
    for i in range(31):
        t.frame_in(i / 30, dropped=i // 3)
        t.model_step(i / 30, skipped=i % 4 == 0)
        t.frame_out(i / 30, 0.08 if i % 2 else None)
    snap = t.snapshot(1.0)
    line = format_status(snap)
    assert line.startswith("[anime | styled]")
    for part in ("in 30.0 fps", "out 30.0/30 fps", "latency p50 80 ms", "dropped 10", "skip 26%"):
        assert part in line
    assert snap.frames_repeated == 16 and snap.frames_out == 31


def test_status_line_redraws_in_place_on_a_terminal_and_prints_lines_otherwise(tmp_path):
    class Tty:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return True

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    tty = Tty()
    line = StatusLine(tty)
    line.update("a", 0.0)
    line.update("b", 0.1)  # within the interval: not drawn
    line.log("hello")
    assert tty.text == "\ra\x1b[K\r\x1b[Khello\na"
    with open(tmp_path / "log", "w") as f:
        plain = StatusLine(f, interval=5.0)
        plain.update("a", 0.0)
        plain.update("b", 1.0)
        plain.update("c", 5.0)
    assert (tmp_path / "log").read_text() == "a\nc\n"
