"""What model to load and how to run it, as plain settings that import no torch.

:class:`ModelSpec` is the daemon config's ``model:`` section (and a preset's overrides of
it); its :class:`Acceleration` keys sit flat in the same YAML section. The schema of that
section is derived from these fields (:mod:`broadcast_filter.control.config`).

A model reference is one of three kinds, told apart by its spelling alone (:func:`ref_kind`):
a hub id ``owner/name`` (always fetched from the Hugging Face hub or its cache, never read
from a folder of that name), an offline model name without any slash (``demo``, ``tiny``),
or a local path (anything else: ``./folder``, ``/abs/model.safetensors``, ``~/models/x``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from broadcast_filter.setting import setting

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: ``owner/name`` with the characters the hub allows (no ``..``, no leading dot or dash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
MODEL_HELP = "hub id owner/name, ./local folder or .safetensors file, or an offline model (demo)"

RefKind = Literal["hub", "name", "path"]


def ref_kind(value: str) -> RefKind:
    """``hub`` for ``owner/name``, ``name`` for a bare word (an offline model), else ``path``."""
    if value.endswith(SINGLE_FILE_SUFFIXES) or "\\" in value or value.startswith(("~", ".")):
        return "path"
    if "/" not in value:
        return "name"
    if _HUB_ID.match(value) and ".." not in value and "--" not in value:
        return "hub"
    return "path"


def absolute(value: str, base: Path) -> str:
    """A local path as an absolute, normalised path; relative ones count from ``base``.
    Pure string work: nothing on disk is touched (``..`` is collapsed, links are not)."""
    return os.path.abspath(os.path.join(base, os.path.expanduser(value)))


@dataclass(frozen=True)
class Acceleration:
    """How the loaded weights run; each switch is measurable on its own
    (:mod:`broadcast_filter.diffusion.accel`)."""

    channels_last: bool = setting(False, help="NHWC memory layout for UNet and VAE")
    attention: Literal["sdpa", "classic"] = setting("sdpa", help="fused or explicit attention")
    compile: bool = setting(False, help="torch.compile UNet and VAE (static shapes)")
    cuda_graphs: bool = setting(False, help="with compile on CUDA: CUDA graph replay")

    def describe(self) -> str:
        on = [name for name in ("channels_last", "compile", "cuda_graphs") if getattr(self, name)]
        return "+".join([*on, self.attention])


ACCEL_KEYS = tuple(f.name for f in fields(Acceleration))
#: Keys whose value names a model, LoRA or folder (checked and resolved as references).
REF_KEYS = ("id", "taesd", "lcm_lora", "single_file_config")


@dataclass(frozen=True)
class ModelSpec:
    """What to load (every field needs a reload to change). Local paths are absolute once
    a config or preset file has been read (:meth:`resolved`)."""

    id: str = setting("stabilityai/sd-turbo", required=True, help=MODEL_HELP)
    taesd: str | None = setting(None, help="tiny autoencoder (madebyollin/taesd)")
    lcm_lora: str | None = setting(None, help="LCM-LoRA fused at scale 1")
    loras: tuple[tuple[str, float], ...] = setting((), help="LoRA id/path: scale")
    device: str = setting("auto", help="auto, cuda, cuda:N, mps or cpu")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = setting("auto")
    single_file_config: str | None = setting(None, help="diffusers folder for a .safetensors")
    cache_dir: str | None = setting(None, help="Hugging Face cache folder")
    accel: Acceleration = setting(factory=Acceleration)

    def with_overrides(self, overrides: Mapping[str, Any]) -> ModelSpec:
        """This spec with flat ``model:`` keys (acceleration keys included) replaced."""
        accel = {k: v for k, v in overrides.items() if k in ACCEL_KEYS}
        own = {k: v for k, v in overrides.items() if k not in ACCEL_KEYS}
        return replace(self, **own, accel=replace(self.accel, **accel))

    def resolved(self, base: Path) -> ModelSpec:
        """Relative local paths made absolute against ``base`` (the file that named them)."""
        return replace(self, **resolve_refs(self.__dict__, base))

    def refs(self) -> Iterator[tuple[str, str]]:
        """``(key, value)`` for every model reference and folder this spec names."""
        yield from refs_of(self.__dict__)


def refs_of(values: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """``(key, value)`` for every reference among flat ``model:`` keys."""
    for key in REF_KEYS:
        if isinstance(values.get(key), str):
            yield f"model.{key}", values[key]
    for name, _scale in values.get("loras") or ():
        yield "model.loras", name
    if isinstance(values.get("cache_dir"), str):
        yield "model.cache_dir", values["cache_dir"]


def resolve_refs(values: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """The path-valued keys among flat ``model:`` keys, made absolute against ``base``."""

    def fix(value: str) -> str:  # a URL stays as written, for the guard to reject
        return absolute(value, base) if ref_kind(value) == "path" and "://" not in value else value

    out: dict[str, Any] = {}
    for key in REF_KEYS:
        if isinstance(values.get(key), str):
            out[key] = fix(values[key])
    if values.get("loras"):
        out["loras"] = tuple((fix(name), scale) for name, scale in values["loras"])
    if isinstance(values.get("cache_dir"), str):
        out["cache_dir"] = absolute(values["cache_dir"], base)
    return out
