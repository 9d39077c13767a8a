"""The controller's per-frame decisions: bypass, passthrough, live params, loading another
model, engine failures."""

from __future__ import annotations

import threading

import pytest
from test_engine import SIZE, moving_frames

from broadcast_filter.control.presets import PresetLibrary
from broadcast_filter.diffusion.spec import ModelSpec
from broadcast_filter.media.base import Frame
from broadcast_filter.runtime.controller import Controller
from broadcast_filter.runtime.engine import load_engine
from broadcast_filter.runtime.telemetry import Telemetry


@pytest.fixture
def base_model(model_cache) -> ModelSpec:
    return ModelSpec(id="tiny", taesd="tiny", device="cpu", cache_dir=model_cache)


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
    assert out.kind == "pass" and out.image is None and c.mode == "passthrough"
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
    assert c.engine.spec.taesd is None


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
        yield  # a pipeline step is a generator

    real = c.engine.pipe
    c.engine.pipe = type(
        "Failing",
        (),
        {"step": lambda self, x: fail(x), "__getattr__": lambda self, n: getattr(real, n)},
    )()
    f = frame(0)
    out = c.process(f, 0.0)
    assert out.kind == "pass" and out.image is None and c.mode == "engine error (passthrough)"
    assert out.fault == "engine out of memory"  # the result carries its classified fault
    assert any("CUDA out of memory" in line for line in logs)
    c.engine.pipe = real
    assert c.process(frame(1), 1.0).kind == "model" and "model recovered" in logs


def test_temporal_fields_are_live_and_a_returning_source_resets_them(library, base_model):
    c = make_controller(library, base_model)
    c.process(frame(0), 0.0)
    pipe = c.engine.pipe
    values = c.set_params({"temporal.feedback": 0.2, "temporal.cache_frames": 2})
    assert values["temporal.feedback"] == 0.2 and values["temporal.flow_blend"] == 0.0
    for i in range(1, 5):
        c.process(frame(i), float(i))
    assert c.engine.pipe is pipe  # nothing rebuilt
    assert pipe.config.temporal.feedback == 0.2 and pipe.config.temporal.cache_frames == 2
    state = pipe.temporal_state
    cuts = state.cuts
    c.source_changed()
    c.process(frame(5), 5.0)
    assert state.cuts == cuts + 1 and state.last_cut == state.frame - 1
    assert len(state.bank) == 0
