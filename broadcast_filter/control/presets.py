"""Presets: one YAML file per look, checked on load, reloaded from disk while running.

A preset's name is its file name without ``.yaml``. Every field but ``model`` is *live*: a
switch crossfades to it without rebuilding anything. ``model`` names another model (its
keys override the daemon's ``model:`` section) and *needs a reload*; the stream stays up
(passing the input through) while that model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from broadcast_filter.control.config import (
    UNSET,
    ConfigError,
    Field,
    Issue,
    ModelSettings,
    Section,
    boolean,
    check_value,
    choice,
    integer,
    load_section,
    model_fields,
    number,
    optional,
    text,
)

NUM_INFERENCE_STEPS = 50
MAX_LEVELS = 4
DEFAULT_T_INDEX = (32, 45)


@dataclass(frozen=True)
class SsfSettings:
    """Stochastic similarity filter: skip the model on near-identical frames."""

    enabled: bool = True
    threshold: float = 0.98
    max_skip: int = 10


@dataclass(frozen=True)
class Preset:
    """One look. ``t_index_list`` is resolved from ``strength``/``steps`` when those are given."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""
    description: str = ""
    guidance_scale: float = 1.2
    delta: float = 1.0
    cfg_type: str = "self"
    t_index_list: tuple[int, ...] = DEFAULT_T_INDEX
    strength: float | None = None
    steps: int | None = None
    seed: int = 2
    ssf: SsfSettings = field(default_factory=SsfSettings)
    transition: float = 1.0
    bypass: bool = False
    model: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def model_settings(self, base: ModelSettings) -> ModelSettings:
        """The model this preset runs on: the daemon's, with this preset's overrides."""
        return ModelSettings(**{**base.__dict__, **self.model})


def _t_index_list(v: Any) -> tuple[int, ...]:
    allowed = (
        f"expected a list of 1 to {MAX_LEVELS} strictly increasing whole numbers "
        f"in 0..{NUM_INFERENCE_STEPS - 1} (larger = closer to the input)"
    )
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_LEVELS:
        raise ValueError(allowed)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise ValueError(allowed)
    if any(not 0 <= i < NUM_INFERENCE_STEPS for i in v) or v != sorted(set(v)):
        raise ValueError(allowed)
    return tuple(v)


def _threshold(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
        raise ValueError("expected a number between 0 and 1 (exclusive), e.g. 0.98")
    return float(v)


def strength_to_t_index_list(strength: float, steps: int) -> tuple[int, ...]:
    """Same mapping as :func:`broadcast_filter.diffusion.stream.strength_to_t_index_list`
    for N = 50 (kept here so checking a preset does not import torch)."""
    n = NUM_INFERENCE_STEPS
    first = min(round(n * (1.0 - strength)), n - steps)
    return tuple(first + ((n - first) * i) // steps for i in range(steps))


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
        values["t_index_list"] = strength_to_t_index_list(values["strength"], values["steps"] or 1)
    values["t_index_list"] = values["t_index_list"] or DEFAULT_T_INDEX
    values["prompt"] = values["prompt"] or ""
    return Preset(name=name, path=path, **values)


def _model_overrides(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not UNSET}


SSF = Section(
    {
        "enabled": Field(boolean, True),
        "threshold": Field(_threshold, 0.98),
        "max_skip": Field(integer(0, 1000), 10),
    },
    SsfSettings,
)

#: The preset schema. ``live=False`` marks fields that need a model reload.
PRESET = Section(
    {
        "description": Field(text(), "", True, "one line for preset lists"),
        "prompt": Field(optional(text(empty=False)), None, True, "the look, in words"),
        "negative_prompt": Field(text(), "", True, "what to avoid (cfg_type full/initialize)"),
        "guidance_scale": Field(number(0, 20), 1.2, True, "crossfaded; > 1 enables CFG"),
        "delta": Field(number(0, 5), 1.0, True, "residual-noise scale for cfg_type self"),
        "cfg_type": Field(choice("none", "self", "initialize", "full"), "self", True),
        "t_index_list": Field(optional(_t_index_list), None, True, "denoising levels"),
        "strength": Field(optional(number(0, 1, open_lo=True)), None, True, "0..1 img2img"),
        "steps": Field(optional(integer(1, MAX_LEVELS)), None, True, "levels for strength"),
        "seed": Field(integer(0, 2**32 - 1), 2, True),
        "ssf": Field(SSF, SsfSettings(), True, "similarity filter"),
        "transition": Field(number(0, 60), 1.0, True, "crossfade seconds"),
        "bypass": Field(boolean, False, True, "true: engine bypassed, input passed through"),
        "model": Field(Section(model_fields(for_preset=True), _model_overrides), {}, False),
    },
    cross=_cross,
)

LIVE_FIELDS = tuple(k for k, f in PRESET.fields.items() if f.live)
RELOAD_FIELDS = tuple(k for k, f in PRESET.fields.items() if not f.live)
#: Fields a control surface may change on the running preset (``Commands.set_param``).
SETTABLE = (
    "prompt",
    "negative_prompt",
    "guidance_scale",
    "delta",
    "cfg_type",
    "t_index_list",
    "strength",
    "seed",
    "transition",
    "bypass",
)


def load_preset(path: str | Path) -> Preset:
    """Read and check one preset file; raise :class:`ConfigError` naming file, line and field."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError([Issue(str(path), 1, "", "a preset file must end in .yaml or .yml")])
    schema = Section(PRESET.fields, lambda **v: _build(path.stem, path, **v), PRESET.cross)
    return load_section(path, schema)


def with_param(preset: Preset, name: str, value: Any) -> Preset:
    """``preset`` with one live field changed; ``ValueError`` names the allowed values."""
    if name not in SETTABLE:
        raise ValueError(f"{name!r} cannot be changed live (allowed: {', '.join(SETTABLE)})")
    if isinstance(value, tuple):
        value = list(value)
    checked = check_value(PRESET, name, value)
    if name == "strength":
        return replace(
            preset,
            strength=checked,
            t_index_list=strength_to_t_index_list(checked, preset.steps or 1),
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
