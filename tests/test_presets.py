"""Preset and daemon-config files: the shipped ones load, every error names file, line and
field, hot reload keeps the last good version, and the loader survives arbitrary input."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broadcast_filter.control.config import ConfigError, load_config
from broadcast_filter.control.presets import (
    LIVE_FIELDS,
    PRESET,
    RELOAD_FIELDS,
    PresetLibrary,
    load_preset,
    with_param,
)
from broadcast_filter.control.transitions import Crossfade, crossfade_weight
from broadcast_filter.diffusion.schedule import strength_to_t_index_list
from broadcast_filter.diffusion.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def preset_file(tmp_path: Path, text: str, name: str = "look") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_preset(path)
    return str(info.value)


# --------------------------------------------------------------------------- shipped files


def test_shipped_presets_load_with_ssf_on_and_passthrough_bypassing():
    presets = {p.stem: load_preset(p) for p in sorted((CONFIGS / "presets").glob("*.yaml"))}
    styles = [p for p in presets.values() if not p.bypass]
    assert len(styles) >= 4
    assert presets["passthrough"].bypass
    assert all(p.ssf.enabled and p.prompt for p in styles)
    assert presets["oil_painting"].t_index_list == strength_to_t_index_list(0.4, steps=2)
    needs_reload = [p.name for p in styles if p.model]
    assert needs_reload == ["dreamshaper_lcm"]


def test_shipped_daemon_configs_load():
    default = load_config(CONFIGS / "default.yaml")
    assert default.model.id == "stabilityai/sd-turbo" and default.model.taesd == "madebyollin/taesd"
    assert default.source.url == "device:0" and [s.url for s in default.sinks] == ["vcam"]
    demo = load_config(CONFIGS / "demo.yaml")
    assert (demo.model.id, demo.source.url, demo.resolution) == ("demo", "testsrc", (128, 128))
    assert [s.url for s in demo.sinks] == ["demo.mp4"]
    assert demo.presets_folder == (CONFIGS / "demo_presets").resolve()
    assert demo.presets.start in {p.stem for p in demo.presets_folder.glob("*.yaml")}


def test_fields_are_marked_live_or_needing_a_reload():
    assert RELOAD_FIELDS == ("model",)
    live = {"prompt", "guidance_scale", "delta", "cfg_type", "t_index_list", "strength", "seed"}
    assert live <= set(LIVE_FIELDS) and not set(RELOAD_FIELDS) & set(LIVE_FIELDS)


# --------------------------------------------------------------------------- error messages


def test_missing_prompt_names_file_line_and_field(tmp_path):
    path = preset_file(tmp_path, "guidance_scale: 1.2\nseed: 3\n")
    assert error_of(path) == (
        f"{path}:1: prompt: missing required field (text describing the look; "
        "only a preset with bypass: true may leave it out)"
    )


def test_wrong_type_names_the_line_and_what_is_allowed(tmp_path):
    path = preset_file(tmp_path, "prompt: a cat\n\nguidance_scale: high\nseed: 1.5\n")
    message = error_of(path)
    assert f"{path}:3: guidance_scale: expected a number >= 0 and <= 20, got 'high'" in message
    assert f"{path}:4: seed: expected a whole number >= 0 and <= 4294967295, got 1.5" in message


def test_unknown_keys_are_errors_at_any_depth(tmp_path):
    path = preset_file(
        tmp_path, "prompt: a cat\npromt: typo\nssf:\n  enabled: true\n  treshold: 1\n"
    )
    message = error_of(path)
    assert re.search(
        rf"{re.escape(str(path))}:2: promt: unknown key \(allowed: description, prompt", message
    )
    assert f"{path}:5: ssf.treshold: unknown key (allowed: enabled, threshold, max_skip)" in message


def test_bad_yaml_reports_file_and_line(tmp_path):
    path = preset_file(tmp_path, "prompt: a cat\nt_index_list: [32, 45\nseed: 2\n")
    message = error_of(path)
    assert message.startswith(f"{path}:") and "invalid YAML" in message
    line = int(message.split(":")[1])
    assert line in (3, 4)
    assert error_of(preset_file(tmp_path, "", "empty")).endswith(
        "file is empty; expected a mapping of key: value"
    )
    assert "expected a mapping" in error_of(preset_file(tmp_path, "- a\n- b\n", "list"))


def test_conflicting_and_out_of_range_denoising_fields(tmp_path):
    both = error_of(preset_file(tmp_path, "prompt: x\nt_index_list: [30]\nstrength: 0.5\n"))
    assert ":3: strength: give either strength (with steps) or t_index_list, not both" in both
    order = error_of(preset_file(tmp_path, "prompt: x\nt_index_list: [45, 30]\n", "order"))
    assert ":2: t_index_list: expected a list of 1 to 4 strictly increasing whole numbers" in order
    steps = error_of(preset_file(tmp_path, "prompt: x\nsteps: 2\n", "steps"))
    assert ":2: steps: steps needs strength" in steps


def test_a_preset_on_another_model_overrides_only_what_it_names(tmp_path):
    p = load_preset(preset_file(tmp_path, "prompt: x\nmodel:\n  id: some/model\n  taesd: null\n"))
    base = ModelSpec(id="stabilityai/sd-turbo", taesd="madebyollin/taesd", device="cuda")
    assert p.model == {"id": "some/model", "taesd": None}
    assert p.model_spec(base) == ModelSpec(id="some/model", taesd=None, device="cuda")
    bad = error_of(preset_file(tmp_path, "prompt: x\nmodel:\n  dtype: fp8\n", "bad"))
    assert ":3: model.dtype: expected one of auto, float16, bfloat16, float32, got 'fp8'" in bad


def test_daemon_config_errors_name_file_and_line(tmp_path):
    path = tmp_path / "daemon.yaml"
    path.write_text(
        "model:\n  id: tiny\n  taesd: 3\nresolution: [100, 64]\nsinks: []\nsource: {fitt: crop}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}:3: model.taesd: expected non-empty text (or null), got 3" in message
    assert f"{path}:4: resolution: expected [width, height], multiples of 8" in message
    assert f"{path}:5: sinks: expected at least 1 item(s)" in message
    assert f"{path}:6: source.fitt: unknown key (allowed: url, fit, options)" in message


def test_obs_section_is_parsed_once_with_line_numbers(tmp_path):
    path = tmp_path / "daemon.yaml"
    base = "model: {id: tiny}\nsinks: [null]\n"
    path.write_text(base + "obs:\n  port: 4455\n  scene_presets: {Gaming: anime}\n")
    obs = load_config(path).obs
    assert (obs.host, obs.port, dict(obs.scene_presets)) == ("127.0.0.1", 4455, {"Gaming": "anime"})
    path.write_text(base + "obs:\n  prot: 4455\n  port: 70000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}:4: obs.prot: unknown key (allowed: host, port, password" in message
    assert f"{path}:5: obs.port: expected a whole number >= 1 and <= 65535, got 70000" in message


# --------------------------------------------------------------------------- live changes


def test_with_param_checks_values_like_the_file_does():
    p = load_preset(CONFIGS / "presets" / "anime.yaml")
    assert with_param(p, "guidance_scale", 1.5).guidance_scale == 1.5
    assert with_param(p, "strength", 0.5).t_index_list == strength_to_t_index_list(0.5, steps=1)
    assert with_param(p, "t_index_list", (20, 40)).t_index_list == (20, 40)
    with pytest.raises(ValueError, match="cfg_type: expected one of none, self, initialize, full"):
        with_param(p, "cfg_type", "half")
    with pytest.raises(ValueError, match="cannot be changed live"):
        with_param(p, "model", {})


def test_crossfade_weight_is_linear_in_time_and_clamped():
    assert [crossfade_weight(10, 2, t) for t in (9, 10, 10.5, 11, 12, 13)] == [
        0,
        0,
        0.25,
        0.5,
        1,
        1,
    ]
    assert crossfade_weight(10, 0, 9) == 1.0  # a cut
    fade = Crossfade(start=0, duration=1, guidance=(1.0, 2.0), delta=(1.0, 0.0))
    assert fade.scalars(fade.weight(0.25)) == (1.25, 0.75)


def touch_later(path: Path, text: str) -> None:
    """Rewrite and bump the mtime, so a rescan sees the edit even within one clock tick."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_hot_reload_picks_up_a_good_edit_and_keeps_the_last_good_version_on_a_broken_one(
    tmp_path,
):
    path = preset_file(tmp_path, "prompt: a cat\nguidance_scale: 1.2\n", "cat")
    library = PresetLibrary(tmp_path)
    assert [(c.name, c.kind) for c in library.scan()] == [("cat", "added")]
    assert library.scan() == []  # nothing changed
    touch_later(path, "prompt: a dog\nguidance_scale: 1.5\n")
    assert [(c.name, c.kind) for c in library.scan()] == [("cat", "updated")]
    assert library.get("cat").prompt == "a dog"
    touch_later(path, "prompt: a dog\nguidance_scale: loud\n")
    changes = library.scan()
    assert [(c.name, c.kind) for c in changes] == [("cat", "error")]
    assert f"{path}:2: guidance_scale: expected a number" in str(changes[0])
    assert "previous version kept" in str(changes[0])
    assert library.get("cat").guidance_scale == 1.5  # still the last good one
    assert "cat" in library.errors
    touch_later(path, "prompt: a fox\n")
    assert [(c.name, c.kind) for c in library.scan()] == [("cat", "updated")]
    assert library.get("cat").prompt == "a fox" and not library.errors
    path.unlink()
    assert [(c.name, c.kind) for c in library.scan()] == [("cat", "removed")]
    with pytest.raises(KeyError, match="known: none"):
        library.get("cat")


# --------------------------------------------------------------------------- any input

FIELD_VALUES = {
    "description": st.text(max_size=20),
    "prompt": st.one_of(st.text(min_size=1, max_size=30), st.integers(), st.none()),
    "negative_prompt": st.text(max_size=20),
    "guidance_scale": st.one_of(st.floats(-5, 30, allow_nan=False), st.text(max_size=5)),
    "delta": st.floats(-1, 6, allow_nan=False),
    "cfg_type": st.sampled_from(["none", "self", "initialize", "full", "half"]),
    "t_index_list": st.lists(st.integers(-5, 60), max_size=5),
    "strength": st.one_of(st.floats(-0.5, 1.5, allow_nan=False), st.none()),
    "seed": st.one_of(st.integers(-10, 2**33), st.booleans()),
    "ssf": st.fixed_dictionaries(
        {},
        optional={
            "enabled": st.booleans(),
            "threshold": st.floats(0, 1),
            "max_skip": st.integers(-2, 20),
        },
    ),
    "transition": st.floats(-1, 100, allow_nan=False),
    "bypass": st.booleans(),
    "colour": st.text(max_size=5),
}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)), st.none(), max_size=8).flatmap(
        lambda keys: st.fixed_dictionaries({k: FIELD_VALUES[k] for k in keys})
    )
)
def test_any_mapping_either_loads_or_every_issue_points_into_the_file(tmp_path, data):
    text = yaml.safe_dump(data, sort_keys=False) if data else "{}\n"
    path = preset_file(tmp_path, text, "any")
    lines = text.count("\n") or 1
    try:
        preset = load_preset(path)
    except ConfigError as exc:
        assert exc.issues
        for issue in exc.issues:
            assert issue.file == str(path) and 1 <= issue.line <= lines
            top = issue.field.split(".")[0].split("[")[0]
            assert top in PRESET.fields or top in data
            assert str(issue).startswith(f"{path}:{issue.line}: ")
    else:
        for key, value in data.items():
            if key in ("prompt", "description", "negative_prompt", "cfg_type", "bypass"):
                assert getattr(preset, key) == (value if value is not None else "")
        assert "colour" not in data


def test_an_unknown_start_preset_in_the_config_names_its_line(tmp_path):
    from broadcast_filter.runtime.build import start_preset

    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "a.yaml").write_text("prompt: a\n")
    path = tmp_path / "daemon.yaml"
    path.write_text("model: {id: tiny}\nsinks: [null]\npresets:\n  folder: presets\n  start: b\n")
    config = load_config(path)
    library = PresetLibrary(config.presets_folder)
    library.scan()
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}:5: presets.start: no preset"):
        start_preset(config, library, None)
    assert start_preset(config, library, "a").name == "a"
