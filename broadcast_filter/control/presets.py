"""Presets: one YAML file per look, checked on load, reloaded from disk while running.

A preset's name is its file name without ``.yaml``. Every field but ``model`` is *live*: a
switch crossfades to it without rebuilding anything. ``model`` names another model (its
keys override the daemon's ``model:`` section) and *needs a reload*; the stream stays up
(passing the input through) while that model loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from broadcast_filter.control.config import (
    ConfigError,
    Issue,
    check_value,
    load_section,
    model_section,
    optional,
    schema_of,
    text,
)
from broadcast_filter.diffusion.schedule import (
    DEFAULT_T_INDEX,
    MAX_LEVELS,
    NUM_INFERENCE_STEPS,
    CfgType,
    check_t_index_list,
    strength_to_t_index_list,
)
from broadcast_filter.diffusion.spec import ModelSpec, resolve_refs
from broadcast_filter.diffusion.temporal_settings import TemporalSettings
from broadcast_filter.setting import setting


def _threshold(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
        raise ValueError("expected a number between 0 and 1 (exclusive), e.g. 0.98")
    return float(v)


@dataclass(frozen=True)
class SsfSettings:
    """Stochastic similarity filter: skip the model on near-identical frames."""

    enabled: bool = setting(True)
    threshold: float = setting(0.98, check=_threshold)
    max_skip: int = setting(10, lo=0, hi=1000)


@dataclass(frozen=True)
class Preset:
    """One look. ``t_index_list`` is resolved from ``strength``/``steps`` when those are given.
    ``live`` fields may be changed on the running preset; ``reload`` ones need a model load."""

    name: str
    description: str = setting("", empty=True, help="one line for preset lists")
    prompt: str = setting(
        "", live=True, check=optional(text(empty=False)), help="the look, in words"
    )
    negative_prompt: str = setting(
        "", live=True, empty=True, help="what to avoid (cfg_type full/initialize)"
    )
    guidance_scale: float = setting(1.2, lo=0, hi=20, live=True, help="crossfaded; > 1: CFG")
    delta: float = setting(1.0, lo=0, hi=5, live=True, help="residual noise scale (self)")
    cfg_type: CfgType = setting("self", live=True)
    t_index_list: tuple[int, ...] = setting(
        DEFAULT_T_INDEX,
        live=True,
        check=optional(check_t_index_list),
        help=f"denoising levels in 0..{NUM_INFERENCE_STEPS - 1}",
    )
    strength: float | None = setting(None, lo=0, hi=1, open_lo=True, live=True, help="0..1")
    steps: int | None = setting(None, lo=1, hi=MAX_LEVELS, help="levels for strength")
    seed: int = setting(2, lo=0, hi=2**32 - 1, live=True)
    ssf: SsfSettings = setting(factory=SsfSettings, help="similarity filter")
    temporal: TemporalSettings = setting(
        factory=TemporalSettings, help="less flicker: feedback, flow blend, attention cache"
    )
    transition: float = setting(1.0, lo=0, hi=60, live=True, help="crossfade seconds")
    bypass: bool = setting(False, live=True, help="true: engine bypassed, input passed on")
    model: dict[str, Any] = setting(factory=dict, reload=True, help="overrides of model:")
    path: Path | None = None

    def model_spec(self, base: ModelSpec) -> ModelSpec:
        """The model this preset runs on: the daemon's, with this preset's overrides."""
        return base.with_overrides(self.model)


def _cross(values: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    if not values.get("bypass") and values.get("prompt") is None:
        problems.append(
            (
                "prompt",
                "missing required field (text describing the look; "
                "only a preset with bypass: true may leave it out)",
            )
        )
    if values.get("t_index_list") is not None and values.get("strength") is not None:
        problems.append(("strength", "give either strength (with steps) or t_index_list, not both"))
    if values.get("steps") is not None and values.get("strength") is None:
        problems.append(("steps", "steps needs strength (or give t_index_list instead)"))
    return problems


def _build(name: str, path: Path, **values: Any) -> Preset:
    if values["strength"] is not None:
        steps = values["steps"] or 1
        values["t_index_list"] = strength_to_t_index_list(values["strength"], steps=steps)
    values["t_index_list"] = values["t_index_list"] or DEFAULT_T_INDEX
    values["prompt"] = values["prompt"] or ""
    values["model"] = {**values["model"], **resolve_refs(values["model"], path.parent.absolute())}
    return Preset(name=name, path=path, **values)


#: The preset schema, derived from :class:`Preset`'s fields.
PRESET = schema_of(
    Preset,
    exclude=("name", "path"),
    cross=_cross,
    checks={"model": model_section(overrides=True)},
)
#: Fields a control surface may change on the running preset (``Commands.set_param``).
LIVE_FIELDS = tuple(f.name for f in fields(Preset) if f.metadata.get("live"))
#: Nested fields a control surface may change, as ``section.field`` (``temporal.feedback``).
LIVE_SUBFIELDS = tuple(f"temporal.{f.name}" for f in fields(TemporalSettings))
#: Fields whose change needs another model loaded.
RELOAD_FIELDS = tuple(f.name for f in fields(Preset) if f.metadata.get("reload"))


def load_preset(path: str | Path) -> Preset:
    """Read and check one preset file; raise :class:`ConfigError` naming file, line and field."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError([Issue(str(path), 1, "", "a preset file must end in .yaml or .yml")])
    schema = dataclasses.replace(PRESET, build=lambda **v: _build(path.stem, path, **v))
    return load_section(path, schema)


def with_param(preset: Preset, name: str, value: Any) -> Preset:
    """``preset`` with one live field changed; ``ValueError`` names the allowed values.
    A nested field is named ``section.field`` (:data:`LIVE_SUBFIELDS`)."""
    if name in LIVE_SUBFIELDS:
        section, sub = name.split(".")
        try:
            checked = check_value(PRESET.fields[section].check, sub, value)
        except ValueError as exc:
            raise ValueError(f"{section}.{exc}") from None
        return replace(preset, **{section: replace(getattr(preset, section), **{sub: checked})})
    if name not in LIVE_FIELDS:
        allowed = ", ".join(LIVE_FIELDS + LIVE_SUBFIELDS)
        raise ValueError(f"{name!r} cannot be changed live (allowed: {allowed})")
    if isinstance(value, tuple):
        value = list(value)
    checked = check_value(PRESET, name, value)
    if name == "t_index_list" and checked is None:
        raise ValueError("t_index_list: expected a list of denoising levels, got None")
    if name == "strength" and checked is None:  # back to the preset's t_index_list as it is
        return replace(preset, strength=None)
    if name == "strength":
        return replace(
            preset,
            strength=checked,
            t_index_list=strength_to_t_index_list(checked, steps=preset.steps or 1),
        )
    if name == "prompt" and checked is None:
        raise ValueError("prompt: expected non-empty text")
    return replace(preset, **{name: checked})


@dataclass(frozen=True)
class Change:
    """What a rescan of the presets folder found for one file."""

    name: str
    kind: str  # "added", "updated", "removed" or "error"
    error: ConfigError | None = None

    def __str__(self) -> str:
        if self.error is not None:
            return f"preset {self.name!r} not (re)loaded, previous version kept:\n{self.error}"
        return f"preset {self.name!r} {self.kind}"


class PresetLibrary:
    """All presets of a folder, in file-name order; :meth:`scan` picks up edits on disk.

    A file that fails to load keeps its previous good version (if any) and is reported in
    :attr:`errors` until it is fixed.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._presets: dict[str, Preset] = {}
        self._stamps: dict[Path, tuple[int, int]] = {}
        self.errors: dict[str, ConfigError] = {}

    def names(self) -> list[str]:
        return sorted(self._presets)

    def get(self, name: str) -> Preset:
        """The preset called ``name``; ``KeyError`` lists the known names."""
        try:
            return self._presets[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise KeyError(f"no preset named {name!r} (known: {known})") from None

    def scan(self) -> list[Change]:
        """Load new and changed files, drop deleted ones; return what changed."""
        if not self.folder.is_dir():
            raise ConfigError([Issue(str(self.folder), 1, "presets.folder", "no such folder")])
        files = {p: _stamp(p) for p in sorted(self.folder.glob("*.y*ml"))}
        changes: list[Change] = []
        for path in set(self._stamps) - set(files):
            del self._stamps[path]
            self.errors.pop(path.stem, None)
            if self._presets.pop(path.stem, None) is not None:
                changes.append(Change(path.stem, "removed"))
        for path, stamp in files.items():
            if stamp is None or self._stamps.get(path) == stamp:
                continue
            self._stamps[path] = stamp
            changes.append(self._load(path))
        return changes

    def _load(self, path: Path) -> Change:
        try:
            preset = load_preset(path)
        except ConfigError as exc:
            self.errors[path.stem] = exc
            return Change(path.stem, "error", exc)
        self.errors.pop(path.stem, None)
        kind = "updated" if path.stem in self._presets else "added"
        self._presets[path.stem] = preset
        return Change(path.stem, kind)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)
