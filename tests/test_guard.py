"""The model-path guard: a preset names models the way a file names things (relative to
its own folder), the guard checks those exact paths, and the loader opens exactly what was
checked: nothing outside the allowed folders, and never a folder standing in for a hub id."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest

from broadcast_filter.control.guard import check_preset_model
from broadcast_filter.control.presets import load_preset
from broadcast_filter.diffusion.models import ModelNotFoundError, load_models
from broadcast_filter.diffusion.offline import ensure_offline_model
from broadcast_filter.diffusion.spec import ModelSpec, ref_kind


def preset_naming(folder: Path, model: str) -> dict:
    """The resolved ``model:`` overrides of a preset file in ``folder`` naming ``model``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "look.yaml"
    path.write_text(f"prompt: x\nmodel:\n  id: {model!r}\n")
    return load_preset(path).model


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def tiny_folder(model_cache: str) -> Path:
    return ensure_offline_model("tiny", model_cache, progress=False)


def test_reference_kinds_are_told_apart_by_spelling():
    assert ref_kind("stabilityai/sd-turbo") == "hub"
    assert ref_kind("demo") == "name"
    for path in ("./x", "../x", "/abs/x", "~/x", "a/b/c", "x.safetensors", "C:\\m", "C:/m"):
        assert ref_kind(path) == "path", path
    assert ref_kind("a/../b") == "path" and ref_kind("a--b/c") == "path"


def test_preset_model_paths_cannot_escape_the_configured_folders(tmp_path):
    presets = tmp_path / "presets"
    roots = [presets]
    (presets / "models").mkdir(parents=True)
    for good in ("stabilityai/sd-turbo", "tiny", str(presets / "models"), "./models"):
        check_preset_model(preset_naming(presets, good), roots)
    for bad in (
        "../../etc/passwd",
        "/etc/shadow",
        "~/.ssh/id_rsa",
        "https://x/y",
        "models/../../x",
    ):
        with pytest.raises(ValueError, match=r"model\.id"):
            check_preset_model(preset_naming(presets, bad), roots)
    with pytest.raises(ValueError, match=r"model\.id: 'nosuch' is not an offline model"):
        check_preset_model(preset_naming(presets, "nosuch"), roots)
    with pytest.raises(ValueError, match=r"model\.loras"):
        check_preset_model({"loras": (("/root/lora.safetensors", 1.0),)}, roots)
    with pytest.raises(ValueError, match="not resolved"):  # a raw relative path: no guessing
        check_preset_model({"id": "./models"}, roots)


def test_a_relative_path_is_never_opened_in_the_working_directory(
    tmp_path, monkeypatch, tiny_folder, model_cache
):
    """The old bug: ``./x`` passed the guard as <presets>/x but was loaded from <cwd>/x."""
    work = tmp_path / "work"
    shutil.copytree(tiny_folder, work / "x")  # a loadable model, outside the roots
    monkeypatch.chdir(work)
    presets = tmp_path / "presets"
    overrides = preset_naming(presets, "./x")
    assert overrides["id"] == str(presets / "x")
    check_preset_model(overrides, [presets])  # inside the root: it is what will be opened
    spec = ModelSpec(id="tiny", device="cpu", cache_dir=model_cache).with_overrides(overrides)
    with pytest.raises(ModelNotFoundError, match=f"no such file or folder {presets / 'x'}"):
        load_models(spec, progress=False)


def test_a_folder_inside_the_allowed_root_loads_from_there(
    tmp_path, monkeypatch, tiny_folder, model_cache
):
    presets = tmp_path / "presets"
    shutil.copytree(tiny_folder, presets / "x")
    monkeypatch.chdir(tmp_path)  # nothing called x here
    overrides = preset_naming(presets, "./x")
    check_preset_model(overrides, [presets])
    spec = ModelSpec(id="tiny", device="cpu", cache_dir=model_cache).with_overrides(overrides)
    bundle = load_models(spec, progress=False)
    assert bundle.name == str(presets / "x")


@pytest.mark.usefixtures("offline")
def test_a_hub_id_is_not_loaded_from_a_local_folder_of_that_name(
    tmp_path, monkeypatch, tiny_folder
):
    shutil.copytree(tiny_folder, tmp_path / "someone" / "model")  # outside the roots
    monkeypatch.chdir(tmp_path)
    presets = tmp_path / "presets"
    overrides = preset_naming(presets, "someone/model")
    assert overrides["id"] == "someone/model"
    check_preset_model(overrides, [presets])  # a hub id passes the guard...
    spec = ModelSpec(device="cpu", cache_dir=str(tmp_path / "hub")).with_overrides(overrides)
    with pytest.raises(ModelNotFoundError, match="is not in the Hugging Face cache"):
        load_models(spec, progress=False)  # ...and is looked up on the hub, not on disk
