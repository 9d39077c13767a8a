"""Runtime pieces without threads: pacing, slots, telemetry, the engine's crossfades and SSF,
and the controller's per-frame decisions (bypass, passthrough, loading another model)."""

from __future__ import annotations

import gc
import math
import threading
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch

from broadcast_filter.control.config import ModelSettings
from broadcast_filter.control.presets import Preset, PresetLibrary, SsfSettings
from broadcast_filter.control.transitions import crossfade_weight, lerp
from broadcast_filter.diffusion.stream import StreamPipeline
from broadcast_filter.media.base import Frame
from broadcast_filter.runtime.controller import Controller
from broadcast_filter.runtime.engine import Engine, load_engine, stream_config
from broadcast_filter.runtime.pacing import PaceState, pace
from broadcast_filter.runtime.telemetry import RateMeter, Ring, StatusLine, Telemetry, format_status
from broadcast_filter.slot import LatestSlot

SIZE = 64

# --------------------------------------------------------------------------- pacing


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


# --------------------------------------------------------------------------- slots


def test_slot_keeps_only_the_newest_value_and_counts_drops():
    slot: LatestSlot[int] = LatestSlot()
    for i in range(5):
        slot.put(i)
    assert slot.take(0) == 4
    assert slot.dropped == 4
    assert slot.take(0) is None  # nothing new
    slot.put(5)
    assert slot.peek() == (5, 6)
    assert slot.take(0) == 5 and slot.dropped == 4


def test_slot_peek_repeats_without_consuming_and_close_wakes_waiters():
    slot: LatestSlot[str] = LatestSlot()
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(slot.take(timeout=10)))
    waiter.start()
    slot.close()
    waiter.join(2)
    assert woke == [None]
    assert slot.peek() == (None, 0)
    assert not slot.wait_first(0)


# --------------------------------------------------------------------------- telemetry


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


# --------------------------------------------------------------------------- engine


class RecordingPipe:
    """The real pipeline, with the conditioning and outputs it is handed recorded."""

    def __init__(self, pipe: StreamPipeline) -> None:
        self.pipe = pipe
        self.embeds: list = []
        self.outputs: list[torch.Tensor] = []

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)

    def set_prompt_embeds(self, embeds) -> None:
        self.embeds.append(embeds)
        self.pipe.set_prompt_embeds(embeds)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = self.pipe(image)
        self.outputs.append(out.clone())
        return out


STYLE_A = Preset(
    "a",
    prompt="a watercolor city",
    guidance_scale=1.2,
    cfg_type="self",
    t_index_list=(32, 45),
    ssf=SsfSettings(enabled=False),
    transition=1.0,
)
STYLE_B = Preset(
    "b",
    prompt="a neon cyberpunk street",
    negative_prompt="blurry",
    guidance_scale=2.0,
    delta=0.5,
    cfg_type="self",
    t_index_list=(30, 40),
    seed=9,
    ssf=SsfSettings(enabled=False),
    transition=1.0,
)


def moving_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(count)]


@pytest.fixture
def recording_engine(tiny_models_taesd):
    pipe = RecordingPipe(StreamPipeline(tiny_models_taesd, stream_config(STYLE_A, SIZE, SIZE)))
    return Engine(pipe, STYLE_A), pipe


def test_crossfade_hands_the_pipeline_the_documented_interpolation(recording_engine):
    engine, pipe = recording_engine
    a = pipe.encode_prompt(STYLE_A.prompt, STYLE_A.negative_prompt)
    b = pipe.encode_prompt(STYLE_B.prompt, STYLE_B.negative_prompt)
    times = [0.0, 0.5, 10.0, 10.25, 10.5, 10.75, 11.0, 11.5]
    frames = moving_frames(len(times))
    outputs = []
    for i, (now, image) in enumerate(zip(times, frames, strict=True)):
        if now == 10.0:
            engine.switch(STYLE_B, now)
            # discrete fields change when the switch starts
            assert pipe.config.t_index_list == (30, 40) and pipe.config.seed == 9
        out, skipped = engine.process(image, now)
        outputs.append(out)
        assert not skipped
        w = crossfade_weight(10.0, 1.0, now) if now >= 10.0 else 0.0
        expected = b if w == 1.0 else a.lerp(b, w) if w else a
        handed = pipe.embeds[-1]
        assert torch.allclose(handed.cond, expected.cond, atol=1e-6), (i, w)
        assert torch.allclose(handed.uncond, expected.uncond, atol=1e-6), (i, w)
        assert pipe.config.guidance_scale == pytest.approx(lerp(1.2, 2.0, w))
        assert pipe.config.delta == pytest.approx(lerp(1.0, 0.5, w))
    # every frame came out: finite, not constant, of the right size
    assert len(pipe.outputs) == len(frames) == len(outputs)
    for out in pipe.outputs:
        assert torch.isfinite(out).all() and out.std() > 0
    assert all(o.shape == (SIZE, SIZE, 3) and o.dtype == np.uint8 for o in outputs)
    assert not engine.fading  # finished at w = 1


def test_a_switch_mid_crossfade_starts_from_the_blend_on_screen(recording_engine):
    engine, pipe = recording_engine
    a = pipe.encode_prompt(STYLE_A.prompt, STYLE_A.negative_prompt)
    b = pipe.encode_prompt(STYLE_B.prompt, STYLE_B.negative_prompt)
    engine.switch(STYLE_B, 0.0)
    engine.process(moving_frames(1)[0], 0.5)
    halfway = a.lerp(b, 0.5)
    engine.switch(STYLE_A, 0.5)  # back to A before B is reached: no jump
    engine.process(moving_frames(2)[1], 1.0)
    expected = halfway.lerp(a, 0.5)
    assert torch.allclose(pipe.embeds[-1].cond, expected.cond, atol=1e-6)
    assert pipe.config.guidance_scale == pytest.approx(lerp(1.6, 1.2, 0.5))


def test_similarity_filter_skips_static_frames_by_reemitting_the_last_output(tiny_models_taesd):
    preset = replace(STYLE_A, ssf=SsfSettings(enabled=True, threshold=0.9, max_skip=3))
    pipe = RecordingPipe(StreamPipeline(tiny_models_taesd, stream_config(preset, SIZE, SIZE)))
    engine = Engine(pipe, preset)
    still = moving_frames(1)[0]
    results = [engine.process(still, float(i)) for i in range(9)]
    skipped = [s for _, s in results]
    # identical frames: every frame after the first skips, at most 3 in a row
    assert skipped == [False, True, True, True, False, True, True, True, False]
    assert len(pipe.outputs) == 3
    first = results[0][0]
    assert all(out is first for out, s in results[1:4])


def test_similarity_filter_never_skips_during_a_crossfade(tiny_models_taesd):
    preset = replace(STYLE_A, ssf=SsfSettings(enabled=True, threshold=0.5, max_skip=10))
    engine = Engine(StreamPipeline(tiny_models_taesd, stream_config(preset, SIZE, SIZE)), preset)
    still = moving_frames(1)[0]
    engine.process(still, 0.0)
    engine.switch(replace(STYLE_B, ssf=preset.ssf), 1.0)
    assert [engine.process(still, t)[1] for t in (1.1, 1.5, 1.9)] == [False, False, False]
    assert engine.process(still, 2.5)[1] is False  # first frame after: the new reference
    assert engine.process(still, 2.6)[1] is True


# --------------------------------------------------------------------------- controller


@pytest.fixture
def base_model(model_cache) -> ModelSettings:
    return ModelSettings(id="tiny", taesd="tiny", device="cpu", cache_dir=model_cache)


def write(folder, name: str, text: str) -> None:
    (folder / f"{name}.yaml").write_text(text)


@pytest.fixture
def library(tmp_path) -> PresetLibrary:
    write(tmp_path, "a", "prompt: a watercolor city\ntransition: 0\nssf: {enabled: false}\n")
    write(tmp_path, "b", "prompt: neon street\nguidance_scale: 1.5\nssf: {enabled: false}\n")
    write(tmp_path, "passthrough", "bypass: true\n")
    write(tmp_path, "other", "prompt: a forest\nssf: {enabled: false}\nmodel: {taesd: null}\n")
    lib = PresetLibrary(tmp_path)
    lib.scan()
    return lib


def make_controller(library, base_model, load=None, logs=None) -> Controller:
    start = library.get("a")
    engine = load_engine(base_model, SIZE, SIZE, start, progress=False)
    return Controller(
        library,
        start,
        engine,
        base_model,
        load or (lambda s, p: load_engine(s, SIZE, SIZE, p, progress=False)),
        Telemetry(15),
        (logs if logs is not None else []).append,
    )


def frame(i: int) -> Frame:
    return Frame(moving_frames(i + 1)[i], captured_at=float(i), index=i)


def test_controller_styles_passes_through_and_bypasses_at_frame_boundaries(library, base_model):
    c = make_controller(library, base_model)
    out = c.process(frame(0), 0.0)
    assert out.kind == "model" and c.mode == "styled"
    c.apply_preset("passthrough")
    f = frame(1)
    out = c.process(f, 1.0)
    assert out.kind == "pass" and out.image is f.image and c.mode == "passthrough"
    assert c.step_preset(-1) == "other" and c.step_preset(-1) == "b"
    out = c.process(frame(2), 2.0)
    assert out.kind == "model" and c.active.name == "b" and c.mode == "crossfade"
    assert c.set_bypass(None) is True
    assert c.process(frame(3), 3.0).kind == "pass" and c.mode == "bypass"
    assert c.set_bypass(False) is False
    status = c.status()
    assert status["preset"] == "b" and status["mode"] == "bypass" and status["bypass"] is True
    with pytest.raises(KeyError, match="known: a, b, other, passthrough"):
        c.apply_preset("nope")


def test_prepare_preset_encodes_the_prompt_before_the_cut_and_changes_nothing_on_air(
    library, base_model
):
    c = make_controller(library, base_model)
    c.process(frame(0), 0.0)
    calls: list[int] = []
    hook = c.engine.pipe.models.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        c.prepare_preset("b")  # studio mode: "b" is in preview
        c.process(frame(1), 1.0)
        assert len(calls) == 1 and c.active.name == "a"  # warmed, not applied
        c.apply_preset("b")  # the cut
        c.process(frame(2), 2.0)
        assert len(calls) == 1 and c.active.name == "b"  # no encoder call at the cut
    finally:
        hook.remove()


def test_controller_set_param_changes_the_running_preset_live(library, base_model):
    c = make_controller(library, base_model)
    c.process(frame(0), 0.0)
    c.set_param("guidance_scale", 1.8)
    c.set_param("t_index_list", [20, 40])
    c.process(frame(1), 1.0)
    assert c.engine.pipe.config.guidance_scale == pytest.approx(1.8)
    assert c.engine.pipe.config.t_index_list == (20, 40)
    with pytest.raises(ValueError, match="guidance_scale: expected a number"):
        c.set_param("guidance_scale", "loud")
    with pytest.raises(ValueError, match="cannot be changed live"):
        c.set_param("model", {"id": "x"})


def test_preset_on_another_model_passes_frames_through_while_it_loads(library, base_model):
    gate = threading.Event()
    loads = []

    def slow_load(settings, preset):
        loads.append(settings)
        gate.wait(30)  # hold the load open while frames keep flowing
        return load_engine(settings, SIZE, SIZE, preset, progress=False)

    logs: list[str] = []
    c = make_controller(library, base_model, load=slow_load, logs=logs)
    c.process(frame(0), 0.0)
    c.apply_preset("other")
    kinds = [c.process(frame(i), float(i)).kind for i in range(1, 5)]
    assert kinds == ["pass"] * 4  # the stream goes on, unstyled
    assert c.mode == "loading tiny (passthrough)"
    assert c.status()["mode"] == "loading tiny (passthrough)"
    assert len(loads) == 1 and loads[0].taesd is None
    assert any("needs model tiny" in line for line in logs)
    gate.set()
    for i in range(5, 200):
        out = c.process(frame(i), float(i))
        if out.kind == "model":
            break
        threading.Event().wait(0.05)
    assert out.kind == "model" and c.mode in ("styled", "crossfade")
    assert c.engine.settings.taesd is None


def test_a_model_that_fails_to_load_is_reported_and_the_previous_preset_returns(
    library, base_model
):
    def broken(settings, preset):
        raise RuntimeError("no such model on this machine")

    logs: list[str] = []
    c = make_controller(library, base_model, load=broken, logs=logs)
    c.process(frame(0), 0.0)
    c.apply_preset("other")
    for i in range(1, 200):
        out = c.process(frame(i), float(i))
        if c.active.name == "a" and out.kind == "model":
            break
        threading.Event().wait(0.02)
    assert c.active.name == "a" and out.kind == "model"
    assert any("could not load model tiny: no such model" in line for line in logs)


def test_engine_failure_passes_frames_through_and_says_so(library, base_model):
    logs: list[str] = []
    c = make_controller(library, base_model, logs=logs)

    def fail(image):
        raise RuntimeError("CUDA out of memory")

    real = c.engine.pipe
    c.engine.pipe = type(
        "Failing",
        (),
        {"__call__": lambda self, x: fail(x), "__getattr__": lambda self, n: getattr(real, n)},
    )()
    f = frame(0)
    out = c.process(f, 0.0)
    assert out.kind == "pass" and out.image is f.image and c.mode == "engine error (passthrough)"
    assert any("CUDA out of memory" in line for line in logs)
    c.engine.pipe = real
    assert c.process(frame(1), 1.0).kind == "model" and "model recovered" in logs


def test_switching_to_a_preset_with_fewer_levels_never_emits_a_flat_frame(recording_engine):
    engine, pipe = recording_engine
    one_step = replace(STYLE_B, t_index_list=(35,), transition=0.5)
    frames = moving_frames(6)
    engine.process(frames[0], 0.0)
    engine.switch(one_step, 1.0)
    for i, image in enumerate(frames[1:], start=1):
        engine.process(image, 1.0 + 0.2 * i)
    assert pipe.config.t_index_list == (35,)
    assert len(pipe.outputs) == 6
    for out in pipe.outputs:
        assert torch.isfinite(out).all() and out.std() > 0


def live_tensors() -> int:
    return sum(type(o) is torch.Tensor for o in gc.get_objects())


def test_the_engine_keeps_nothing_per_frame(tiny_models_taesd):
    engine = Engine(StreamPipeline(tiny_models_taesd, stream_config(STYLE_A, SIZE, SIZE)), STYLE_A)
    frames = moving_frames(8)
    for i in range(10):
        engine.process(frames[i % 8], float(i))
    gc.collect()
    tensors = live_tensors()
    outputs = []
    for i in range(10, 70):
        out, _ = engine.process(frames[i % 8], float(i))
        outputs.append(weakref.ref(out))
        del out
    gc.collect()
    assert sum(ref() is not None for ref in outputs) == 1  # only the last (for SSF re-emits)
    assert live_tensors() == tensors
