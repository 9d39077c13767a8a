"""Checks on names that come from preset files before anything is loaded from them.

A preset may name another model (``model:`` keys). Its local paths were made absolute
against the preset's folder when the file was read
(:meth:`~broadcast_filter.diffusion.spec.ModelSpec.resolved`), and the loader opens exactly
those paths. Here each reference is checked: a hub id is ``owner/name`` (fetched from the
hub, never read from a folder of that name), an offline model must be known, and a local
path must lie inside one of the allowed folders (the config file's folder, the presets
folder, the model cache), links followed, so a preset cannot make the daemon read files
elsewhere on the machine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from broadcast_filter.diffusion.offline import OFFLINE_MODELS
from broadcast_filter.diffusion.spec import ref_kind, refs_of


def check_model_ref(field: str, value: str, roots: Iterable[Path]) -> None:
    """Raise ``ValueError`` unless ``value`` is a hub id, an offline model, or an absolute
    path inside ``roots``."""
    if "://" in value or "\x00" in value:
        raise ValueError(f"{field}: {value!r} is not a model id or a local path")
    kind = ref_kind(value)
    if kind == "hub":
        return
    if kind == "name":
        if value not in OFFLINE_MODELS:
            known = ", ".join(OFFLINE_MODELS)
            raise ValueError(f"{field}: {value!r} is not an offline model ({known})")
        return
    roots = [Path(r).resolve() for r in roots]
    target = Path(value)
    if not target.is_absolute():  # a caller skipped ModelSpec.resolved: never guess a base
        raise ValueError(f"{field}: path {value!r} was not resolved against its file's folder")
    if not any(target.resolve().is_relative_to(r) for r in roots):
        where = ", ".join(str(r) for r in roots) or "none configured"
        raise ValueError(f"{field}: path {value!r} is outside the allowed folders ({where})")


def check_preset_model(overrides: Mapping[str, Any], roots: Iterable[Path]) -> None:
    """Check a preset's ``model:`` overrides (ids, paths, LoRA names) before loading."""
    roots = list(roots)
    for field, value in refs_of(overrides):
        check_model_ref(field, value, roots)
