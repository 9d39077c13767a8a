"""YAML files with line-numbered validation, and the daemon's own configuration file.

Files are *composed* into a node tree (not just loaded) so every problem can name the file,
the line and the field, and say what is allowed. Unknown keys are errors. A schema is a
:class:`Section` of :class:`Field` checks; a check is a plain function that returns the
cleaned value or raises ``ValueError("expected ...")``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

Check = Callable[[Any], Any]
REQUIRED: Any = object()
UNSET: Any = object()


@dataclass(frozen=True)
class Issue:
    """One problem in one file."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class ConfigError(ValueError):
    """A file is invalid; ``str()`` lists every problem, one a line."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class UsageError(ValueError):
    """A command-line value is invalid (exit code 2, like a configuration error)."""


def line_of(path: Path, *keys: str) -> int:
    """The line of the nested key ``keys`` in ``path`` (1 if it is not there)."""
    node = read_node(path)
    line = 1
    for key in keys:
        match = isinstance(node, yaml.MappingNode) and next(
            ((k, v) for k, v in node.value if getattr(k, "value", None) == key), None
        )
        if not match:
            return line
        line, node = _line(match[0]), match[1]
    return line


@dataclass(frozen=True)
class Field:
    """One key of a mapping: its check (or nested :class:`Section`), default, and whether a
    change takes effect live or needs a model reload."""

    check: Check | Section
    default: Any = None
    live: bool = True
    help: str = ""


@dataclass(frozen=True)
class Section:
    """A mapping with known keys; ``build`` turns the checked values into an object;
    ``cross`` returns ``(field, message)`` pairs for rules that involve several fields;
    ``shorthand`` names the key a plain scalar stands for (``- vcam`` means ``url: vcam``)."""

    fields: Mapping[str, Field]
    build: Callable[..., Any] = dict
    cross: Callable[[dict[str, Any]], list[tuple[str, str]]] = lambda values: []
    shorthand: str | None = None


@dataclass(frozen=True)
class Items:
    """A list whose every element passes ``item`` (a check or a section)."""

    item: Check | Section
    min_len: int = 0


# ----------------------------------------------------------------------------- checks


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def number(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False) -> Check:
    """A real number in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
    low = "" if lo is None else f"{'>' if open_lo else '>='} {lo:g}"
    high = "" if hi is None else f"<= {hi:g}"
    allowed = "a number" + (f" {low}" if low else "") + (" and" if low and high else "")
    allowed += f" {high}" if high else ""

    def check(v: Any) -> float:
        ok = _is_number(v) and v == v
        ok = ok and (lo is None or (v > lo if open_lo else v >= lo)) and (hi is None or v <= hi)
        if not ok:
            raise ValueError(f"expected {allowed}")
        return float(v)

    return check


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    """A whole number in ``[lo, hi]``."""
    bounds = [f">= {lo}"] if lo is not None else []
    bounds += [f"<= {hi}"] if hi is not None else []
    allowed = "a whole number" + (" " + " and ".join(bounds) if bounds else "")

    def check(v: Any) -> int:
        ok = isinstance(v, int) and not isinstance(v, bool)
        if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"expected {allowed}")
        return v

    return check


def text(*, empty: bool = True) -> Check:
    """A string (non-empty unless ``empty``)."""

    def check(v: Any) -> str:
        if not isinstance(v, str) or (not empty and not v.strip()):
            raise ValueError("expected text" if empty else "expected non-empty text")
        return v

    return check


def optional(inner: Check) -> Check:
    """``inner`` or ``null``."""

    def check(v: Any) -> Any:
        if v is None:
            return None
        try:
            return inner(v)
        except ValueError as exc:
            raise ValueError(f"{exc} (or null)") from None

    return check


def choice(*options: str) -> Check:
    """One of ``options``."""

    def check(v: Any) -> str:
        if v not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return v

    return check


def boolean(v: Any) -> bool:
    """``true`` or ``false``."""
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


# ----------------------------------------------------------------------------- reading


def read_node(path: Path) -> yaml.Node:
    """Compose ``path`` into a node tree; bad YAML and empty files raise :class:`ConfigError`."""
    try:
        content = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Issue(str(path), 1, "", f"cannot read file: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text (byte {exc.start})"
        raise ConfigError([Issue(str(path), 1, "", message)]) from exc
    try:
        node = yaml.compose(content, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError([Issue(str(path), line, "", f"invalid YAML: {problem}")]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([Issue(str(path), 1, "", f"invalid YAML: {exc}")]) from exc
    if node is None:
        raise ConfigError(
            [Issue(str(path), 1, "", "file is empty; expected a mapping of key: value")]
        )
    return node


def _construct(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_document(node)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


class _Reader:
    """Walks a node tree against a schema, collecting every issue instead of stopping early."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.issues: list[Issue] = []

    def issue(self, node: yaml.Node, name: str, message: str) -> None:
        self.issues.append(Issue(self.file, _line(node), name, message))

    def value(self, node: yaml.Node, schema: Check | Section | Items, name: str) -> Any:
        if isinstance(schema, Section):
            return self.section(node, schema, name)
        if isinstance(schema, Items):
            return self.items(node, schema, name)
        try:
            raw = _construct(node)
        except yaml.YAMLError as exc:
            self.issue(node, name, f"cannot read value: {exc}")
            return None
        try:
            return schema(raw)
        except ValueError as exc:
            self.issue(node, name, f"{exc}, got {_shown(raw)}")
            return None

    def items(self, node: yaml.Node, schema: Items, name: str) -> tuple[Any, ...]:
        if not isinstance(node, yaml.SequenceNode):
            self.issue(node, name, "expected a list")
            return ()
        if len(node.value) < schema.min_len:
            self.issue(node, name, f"expected at least {schema.min_len} item(s)")
        return tuple(self.value(n, schema.item, f"{name}[{i}]") for i, n in enumerate(node.value))

    def section(self, node: yaml.Node, schema: Section, name: str) -> Any:
        if schema.shorthand and isinstance(node, yaml.ScalarNode):
            if node.tag == "tag:yaml.org,2002:null" and node.value:  # `- null`: the null sink
                node = yaml.ScalarNode("tag:yaml.org,2002:str", node.value, node.start_mark)
            value = self.value(node, schema.fields[schema.shorthand].check, name)
            return self._build(node, schema, name, {schema.shorthand: value}, {})
        if not isinstance(node, yaml.MappingNode):
            self.issue(node, name or "(top level)", "expected a mapping of key: value")
            return None
        values: dict[str, Any] = {}
        lines: dict[str, yaml.Node] = {}
        allowed = ", ".join(schema.fields)
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            full = f"{name}.{key}" if name else str(key)
            if key not in schema.fields:
                self.issue(key_node, full, f"unknown key (allowed: {allowed})")
            elif key in lines:
                self.issue(key_node, full, "given twice")
            else:
                lines[key] = key_node
                values[key] = self.value(value_node, schema.fields[key].check, full)
        for key, spec in schema.fields.items():
            if spec.default is REQUIRED and key not in values:
                full = f"{name}.{key}" if name else key
                hint = f" ({spec.help})" if spec.help else ""
                self.issue(node, full, f"missing required field{hint}")
        return self._build(node, schema, name, values, lines)

    def _build(
        self,
        node: yaml.Node,
        schema: Section,
        name: str,
        values: dict[str, Any],
        lines: dict[str, yaml.Node],
    ) -> Any:
        if self.issues:
            return None
        for key, message in schema.cross(values):
            full = f"{name}.{key}" if name else key
            self.issue(lines.get(key, node), full, message)
        if self.issues:
            return None
        defaults = {k: f.default for k, f in schema.fields.items() if f.default is not REQUIRED}
        return schema.build(**{**defaults, **values})


def load_section(path: Path, schema: Section, /, **extra: Any) -> Any:
    """Read ``path`` and check it against ``schema``; ``extra`` keys go to ``schema.build``."""
    node = read_node(path)
    reader = _Reader(str(path))
    wrapped = Section(schema.fields, lambda **v: schema.build(**v, **extra), schema.cross)
    result = reader.section(node, wrapped, "")
    if reader.issues:
        raise ConfigError(reader.issues)
    return result


def check_value(schema: Section, name: str, value: Any) -> Any:
    """Check one top-level field given as a Python value (e.g. from a control surface)."""
    if name not in schema.fields:
        raise ValueError(f"unknown parameter {name!r} (allowed: {', '.join(schema.fields)})")
    spec = schema.fields[name].check
    if not callable(spec) or isinstance(spec, Section | Items):
        raise ValueError(f"{name} cannot be set on its own")
    try:
        return spec(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}, got {_shown(value)}") from exc


# ----------------------------------------------------------------------------- daemon config

MODEL_HELP = "hub id, local folder, .safetensors file, or an offline model such as 'tiny'"


def _loras(v: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and _is_number(s) for k, s in v.items()
    ):
        raise ValueError("expected a mapping of LoRA id/path: scale (a number)")
    return tuple((k, float(s)) for k, s in v.items())


@dataclass(frozen=True)
class ModelSettings:
    """Which model to load (all fields need a reload to change)."""

    id: str
    taesd: str | None = None
    lcm_lora: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    device: str = "auto"
    dtype: str = "auto"
    single_file_config: str | None = None
    cache_dir: str | None = None
    channels_last: bool = False
    attention: str = "sdpa"
    compile: bool = False
    cuda_graphs: bool = False


def model_fields(*, for_preset: bool = False) -> dict[str, Field]:
    """The ``model:`` keys. In a preset every key is optional (``UNSET`` when absent) and
    overrides the daemon's model; any of them needs a reload."""
    fields = {
        "id": Field(text(empty=False), REQUIRED, False, MODEL_HELP),
        "taesd": Field(optional(text(empty=False)), None, False),
        "lcm_lora": Field(optional(text(empty=False)), None, False),
        "loras": Field(_loras, (), False),
        "device": Field(text(empty=False), "auto", False),
        "dtype": Field(choice("auto", "float16", "bfloat16", "float32"), "auto", False),
        "single_file_config": Field(optional(text(empty=False)), None, False),
        "cache_dir": Field(optional(text(empty=False)), None, False),
        "channels_last": Field(boolean, False, False),
        "attention": Field(choice("sdpa", "classic"), "sdpa", False),
        "compile": Field(boolean, False, False),
        "cuda_graphs": Field(boolean, False, False),
    }
    if for_preset:
        return {k: replace(f, default=UNSET) for k, f in fields.items()}
    return fields


@dataclass(frozen=True)
class SourceSettings:
    url: str | None = None
    fit: str = "crop"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SinkSettings:
    url: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PresetSettings:
    folder: str = "presets"
    start: str | None = None


@dataclass(frozen=True)
class SafetySettings:
    """On-air safety (see :mod:`broadcast_filter.runtime.watchdog`); all need a restart."""

    stall_s: float = 1.0  # one engine call longer than this: pass the input through
    restart_after: int = 5  # failed engine calls in a row before the engine is rebuilt
    recover_after: int = 3  # good calls in a row before fading back to the filter
    fade_s: float = 0.5  # crossfade back from the input to the filtered picture
    hold_s: float = 2.0  # source lost: hold the last frame this long, then a slate
    sink_retry_s: float = 1.0  # first re-open attempt of a failed sink (then doubling)
    sink_retry_max_s: float = 30.0  # longest wait between re-open attempts


SAFETY = Section(
    {
        "stall_s": Field(number(0, 60, open_lo=True), 1.0, False),
        "restart_after": Field(integer(1, 1000), 5, False),
        "recover_after": Field(integer(1, 1000), 3, False),
        "fade_s": Field(number(0, 10), 0.5, False),
        "hold_s": Field(number(0, 3600), 2.0, False),
        "sink_retry_s": Field(number(0, 60, open_lo=True), 1.0, False),
        "sink_retry_max_s": Field(number(0, 3600, open_lo=True), 30.0, False),
    },
    SafetySettings,
)


@dataclass(frozen=True)
class DaemonConfig:
    """The whole daemon: model, frame size and rate, source, sinks, presets, OBS (raw)."""

    path: Path
    model: ModelSettings
    resolution: tuple[int, int]
    fps: float
    source: SourceSettings
    sinks: tuple[SinkSettings, ...]
    presets: PresetSettings
    obs: dict[str, Any] | None = None
    safety: SafetySettings = field(default_factory=SafetySettings)

    @property
    def width(self) -> int:
        return self.resolution[0]

    @property
    def height(self) -> int:
        return self.resolution[1]

    @property
    def presets_folder(self) -> Path:
        """The presets folder, relative to the config file's folder."""
        return (self.path.parent / self.presets.folder).resolve()


def _resolution(v: Any) -> tuple[int, int]:
    ok = isinstance(v, list) and len(v) == 2
    ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    if not ok or not all(64 <= x <= 2048 and x % 8 == 0 for x in v):
        raise ValueError("expected [width, height], multiples of 8 between 64 and 2048")
    return (v[0], v[1])


def _options(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise ValueError("expected a mapping of option: value")
    return v


def _obs(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError("expected a mapping (the OBS bridge settings)")
    return v


SOURCE = Section(
    {
        "url": Field(optional(text(empty=False)), None, True, "device, file, URL, or null"),
        "fit": Field(choice("crop", "letterbox", "stretch"), "crop"),
        "options": Field(_options, {}),
    },
    SourceSettings,
)
SINK = Section(
    {
        "url": Field(text(empty=False), REQUIRED, True, "vcam, null, a file or a URL"),
        "options": Field(_options, {}),
    },
    SinkSettings,
    shorthand="url",
)
DAEMON = Section(
    {
        "model": Field(Section(model_fields(), ModelSettings), REQUIRED, False, "id: ..."),
        "resolution": Field(_resolution, (512, 512), False),
        "fps": Field(number(1, 240), 30.0, False),
        "source": Field(SOURCE, SourceSettings(), False),
        "sinks": Field(Items(SINK, 1), REQUIRED, False, "a list such as [vcam]"),
        "presets": Field(
            Section(
                {
                    "folder": Field(text(empty=False), "presets"),
                    "start": Field(optional(text(empty=False)), None),
                },
                PresetSettings,
            ),
            PresetSettings(),
        ),
        "obs": Field(_obs, None, False, "settings of the OBS bridge"),
        "safety": Field(SAFETY, SafetySettings(), False, "on-air safety timings"),
    },
    DaemonConfig,
)


def load_config(path: str | Path) -> DaemonConfig:
    """Read and check a daemon YAML file; raise :class:`ConfigError` naming file and line."""
    path = Path(path)
    config = load_section(path, DAEMON, path=path)
    if config.obs is not None:
        _check_obs(path, config.obs)
    return config


def _check_obs(path: Path, raw: dict[str, Any]) -> None:
    """The ``obs:`` section belongs to the OBS bridge: it must be installed and accept it."""
    line = line_of(path, "obs")
    try:
        from broadcast_filter.control.obs_bridge import ObsSettings
    except ImportError as exc:
        message = f"the OBS bridge is not available ({exc}); remove the obs: section"
        raise ConfigError([Issue(str(path), line, "obs", message)]) from exc
    where = f"{path}:{line}"
    try:
        ObsSettings.from_mapping(raw, where)
    except (TypeError, ValueError) as exc:
        message = str(exc).removeprefix(f"{where}: ")
        raise ConfigError([Issue(str(path), line, "", message)]) from exc
