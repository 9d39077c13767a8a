"""Checks on names that come from preset files before anything is loaded from them.

A preset may name another model (``model:`` keys). Those values are checked before use: a
hub id must look like ``owner/name`` (no ``..``, no URL), an offline model must be known,
and a local path must lie inside one of the configured folders (the config file's folder,
the presets folder, the model cache), so a preset cannot make the daemon read files
elsewhere on the machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
PATH_KEYS = ("id", "taesd", "lcm_lora", "single_file_config", "cache_dir")


def _offline() -> set[str]:
    try:
        from broadcast_filter.diffusion.offline import OFFLINE_MODELS
    except ImportError:
        return set()
    return set(OFFLINE_MODELS)


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~", "\\")) or "\\" in value or value.count("/") != 1


def check_model_ref(field: str, value: str, roots: Iterable[Path]) -> None:
    """Raise ``ValueError`` unless ``value`` is a hub id, an offline model, or a path inside
    ``roots``."""
    if "://" in value or "\x00" in value:
        raise ValueError(f"{field}: {value!r} is not a model id or a local path")
    if value in _offline():
        return
    if not _looks_like_path(value) and HUB_ID.match(value) and ".." not in value:
        return
    roots = [Path(r).resolve() for r in roots]
    target = Path(value).expanduser()
    resolved = target.resolve() if target.is_absolute() else None
    inside = [r for r in roots if (resolved or (r / target).resolve()).is_relative_to(r)]
    if not inside:
        where = ", ".join(str(r) for r in roots) or "none configured"
        raise ValueError(f"{field}: path {value!r} is outside the allowed folders ({where})")


def check_preset_model(overrides: dict[str, Any], roots: Iterable[Path]) -> None:
    """Check a preset's ``model:`` overrides (ids, paths, LoRA names) before loading."""
    roots = list(roots)
    for key in PATH_KEYS:
        value = overrides.get(key)
        if isinstance(value, str):
            check_model_ref(f"model.{key}", value, roots)
    for name, _scale in overrides.get("loras", ()) or ():
        check_model_ref("model.loras", name, roots)
