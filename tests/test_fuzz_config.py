"""Fuzzing the daemon config loader (presets are fuzzed in test_presets.py): arbitrary text
and structured garbage give a valid config or a :class:`ConfigError` naming the file, never
another exception; a broken preset edit while running keeps the previous version."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broadcast_filter.control.config import ConfigError, DaemonConfig, load_config
from broadcast_filter.control.presets import PresetLibrary

FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
keys = st.sampled_from(
    ["model", "resolution", "fps", "source", "sinks", "presets", "safety", "obs", "x"]
)
SAFETY_KEYS = st.sampled_from(["stall_s", "hold_s", "restart_after", "fade_s", "zz"])
configs = st.dictionaries(keys, values, max_size=8) | st.fixed_dictionaries(
    {
        "model": st.fixed_dictionaries({"id": st.text(min_size=1, max_size=8)}),
        "sinks": st.just(["null"]),
        "safety": st.dictionaries(SAFETY_KEYS, values, max_size=4),
    }
)


def load_or_error(path) -> DaemonConfig | ConfigError:
    try:
        return load_config(path)
    except ConfigError as exc:
        assert exc.issues and all(i.file == str(path) for i in exc.issues)
        return exc


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_loads_or_names_the_file(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    load_or_error(path)


@FUZZ
@given(configs)
def test_structured_garbage_loads_or_names_file_and_line(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    text = yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    result = load_or_error(path)
    if isinstance(result, ConfigError):
        assert all(1 <= i.line <= text.count("\n") + 1 for i in result.issues)
    else:
        assert result.safety.stall_s > 0 and result.sinks


@FUZZ
@given(st.binary(max_size=200))
def test_a_garbage_preset_edit_never_replaces_the_good_version(tmp_path, junk):
    folder = tmp_path / "p"
    folder.mkdir(exist_ok=True)
    path = folder / "look.yaml"
    path.write_text("prompt: good\n")
    library = PresetLibrary(folder)
    library.scan()
    path.write_bytes(b"prompt: bad\nguidance_scale: " + junk)
    import os

    os.utime(path, ns=(1, 10**18))
    changes = library.scan()  # never raises
    preset = library.get("look")
    assert preset.prompt in ("good", "bad")
    if preset.prompt == "bad":  # applied only as a whole, valid file
        assert not library.errors
    else:
        assert [c.kind for c in changes] in (["error"], [])
