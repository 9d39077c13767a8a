"""Each setting is declared once: the YAML schema is derived from the dataclasses that use
the values, the preset checks accept exactly what the pipeline accepts, and the settings
import without torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broadcast_filter.control.config import DAEMON, REQUIRED, model_section
from broadcast_filter.control.presets import PRESET, Preset, with_param
from broadcast_filter.diffusion.schedule import CFG_TYPES, DEFAULT_T_INDEX, NUM_INFERENCE_STEPS
from broadcast_filter.diffusion.spec import Acceleration, ModelSpec
from broadcast_filter.diffusion.stream import StreamConfig
from broadcast_filter.runtime.watchdog import SafetySettings


def test_the_model_section_is_the_model_spec_with_its_acceleration_flat():
    keys = [f.name for f in dataclasses.fields(ModelSpec) if f.name != "accel"]
    keys += [f.name for f in dataclasses.fields(Acceleration)]
    assert list(model_section().fields) == keys
    assert DAEMON.fields["model"].default is REQUIRED
    spec = model_section().build(**{k: f.default for k, f in model_section().fields.items()})
    assert spec == ModelSpec(id=REQUIRED)  # every default is ModelSpec's own


def test_safety_defaults_are_the_watchdogs():
    section = DAEMON.fields["safety"].check
    assert section.build(**{k: f.default for k, f in section.fields.items()}) == SafetySettings()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-5, NUM_INFERENCE_STEPS + 5), max_size=6))
def test_the_preset_accepts_exactly_the_levels_the_pipeline_accepts(levels):
    try:
        StreamConfig(t_index_list=tuple(levels)).validate()
        pipeline_ok = True
    except ValueError:
        pipeline_ok = False
    try:
        with_param(Preset("p"), "t_index_list", levels)
        preset_ok = True
    except ValueError:
        preset_ok = False
    assert preset_ok == pipeline_ok


@pytest.mark.parametrize("cfg", [*CFG_TYPES, "half", ""])
def test_the_preset_accepts_exactly_the_cfg_modes_the_pipeline_runs(cfg):
    pipeline_ok = cfg in CFG_TYPES
    try:
        StreamConfig(cfg_type=cfg).validate()
    except ValueError:
        assert not pipeline_ok
    else:
        assert pipeline_ok
    if pipeline_ok:
        assert with_param(Preset("p"), "cfg_type", cfg).cfg_type == cfg
    else:
        with pytest.raises(ValueError, match="cfg_type: expected one of none, self"):
            with_param(Preset("p"), "cfg_type", cfg)


def test_preset_defaults_are_the_pipelines():
    assert PRESET.fields["t_index_list"].default == DEFAULT_T_INDEX == StreamConfig().t_index_list
    preset, stream = Preset("p"), StreamConfig()
    assert (preset.guidance_scale, preset.delta, preset.cfg_type, preset.seed) == (
        stream.guidance_scale,
        stream.delta,
        stream.cfg_type,
        stream.seed,
    )


def test_settings_and_presets_load_without_torch(tmp_path):
    preset = tmp_path / "look.yaml"
    preset.write_text("prompt: x\nstrength: 0.5\nsteps: 2\nmodel: {id: ./here}\n")
    code = (
        "import sys\n"
        "from broadcast_filter.control.config import load_config\n"
        "from broadcast_filter.control.presets import load_preset\n"
        "import broadcast_filter.diffusion as d\n"
        f"p = load_preset({str(preset)!r})\n"
        "assert p.t_index_list == d.strength_to_t_index_list(0.5, steps=2), p\n"
        "assert d.ModelSpec(id='x').accel == d.Acceleration()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(p.model['id'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "here")  # resolved against the file's folder
