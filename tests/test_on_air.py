"""The one place that chooses each tick's picture: styled result, live input, crossfade,
held picture or slate, at the sinks' size."""

from __future__ import annotations

import numpy as np

from broadcast_filter.media.base import Frame
from broadcast_filter.runtime.controller import Result
from broadcast_filter.runtime.on_air import Switcher
from broadcast_filter.runtime.telemetry import Telemetry
from broadcast_filter.runtime.watchdog import SafetySettings, Watchdog
from broadcast_filter.slot import LatestSlot

SAFETY = SafetySettings(stall_s=0.5, restart_after=3, recover_after=1, fade_s=1.0, hold_s=2.0)


def image(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def switcher(size=(8, 8)) -> tuple[Switcher, LatestSlot, LatestSlot, Watchdog, list[str]]:
    inputs: LatestSlot[Frame] = LatestSlot()
    results: LatestSlot[Result] = LatestSlot()
    watchdog, logs = Watchdog(SAFETY), []
    return (
        Switcher(watchdog, inputs, results, size, Telemetry(30), logs.append),
        inputs,
        results,
        watchdog,
        logs,
    )


def test_nothing_goes_on_air_before_the_first_result():
    s, inputs, _, _, _ = switcher()
    inputs.put(Frame(image(10), 1.0))
    assert s.picture(1.0, input_age=0.0, source_lost=False) is None


def test_a_styled_result_goes_on_air_and_nothing_styled_means_the_live_input():
    s, inputs, results, _, _ = switcher()
    inputs.put(Frame(image(10), 1.0))
    results.put(Result(image(200), 1.0, "model"))
    styled = s.picture(1.1, input_age=0.1, source_lost=False)
    assert styled.image[0, 0, 0] == 200 and styled.captured_at == 1.0 and styled.key[0] == "engine"
    results.put(Result(None, 1.2, "pass"))  # bypass / loading: nothing styled
    inputs.put(Frame(image(30), 1.3))  # a newer input arrived since
    live = s.picture(1.35, input_age=0.05, source_lost=False)
    assert live.image[0, 0, 0] == 30 and live.captured_at == 1.3 and live.key[0] == "input"


def test_a_fault_passes_the_input_then_fades_back_to_the_filter():
    s, inputs, results, watchdog, logs = switcher()
    inputs.put(Frame(image(0), 0.0))
    results.put(Result(image(200), 0.0, "model"))
    watchdog.started(0.0)
    watchdog.finished(0.1, "engine output NaN/inf")
    passed = s.picture(0.2, input_age=0.1, source_lost=False)
    assert passed.image[0, 0, 0] == 0 and passed.key[0] == "input"
    watchdog.started(1.0)
    watchdog.finished(1.0, None)  # recover_after=1: fade from t=1.0 over 1 s
    half = s.picture(1.5, input_age=0.1, source_lost=False)
    assert half.key[0] == "fade" and 90 <= half.image[0, 0, 0] <= 110
    assert s.picture(2.5, input_age=0.1, source_lost=False).image[0, 0, 0] == 200
    assert any("on air: pass (passthrough: engine output NaN/inf)" in line for line in logs)


def test_a_lost_source_holds_then_shows_the_slate_at_the_sinks_size():
    s, inputs, results, _, _ = switcher(size=(16, 8))
    inputs.put(Frame(image(10), 0.0))
    results.put(Result(image(200), 0.0, "model"))
    held = s.picture(1.0, input_age=1.0, source_lost=True)
    assert held.image.shape == (8, 16, 3) and held.image[0, 0, 0] == 200
    slate = s.picture(3.0, input_age=3.0, source_lost=True)
    assert (
        slate.captured_at is None and slate.key == ("slate", 0) and slate.image.shape == (8, 16, 3)
    )
