"""YAML files with line-numbered validation, and the daemon's own configuration file.

Files are *composed* into a node tree (not just loaded) so every problem can name the file,
the line and the field, and say what is allowed. Unknown keys are errors. A schema is a
:class:`Section` of :class:`Field` checks; a check is a plain function that returns the
cleaned value or raises ``ValueError("expected ...")``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from broadcast_filter.control.api_settings import ApiSettings, is_loopback
from broadcast_filter.control.obs_settings import ObsSettings
from broadcast_filter.diffusion.spec import Acceleration, ModelSpec, resolve_refs
from broadcast_filter.runtime.watchdog import SafetySettings
from broadcast_filter.setting import setting

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
    """One key of a mapping: its check (or nested :class:`Section`), default and help."""

    check: Check | Section | Items
    default: Any = None
    help: str = ""
    secret: bool = False  # errors never echo the value (passwords)


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


def is_number(v: Any) -> bool:
    """A real number (``True``/``False`` are not numbers here)."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def number(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False) -> Check:
    """A real number in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
    low = "" if lo is None else f"{'>' if open_lo else '>='} {lo:g}"
    high = "" if hi is None else f"<= {hi:g}"
    allowed = "a number" + (f" {low}" if low else "") + (" and" if low and high else "")
    allowed += f" {high}" if high else ""

    def check(v: Any) -> float:
        ok = is_number(v) and v == v
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

    def value(
        self, node: yaml.Node, schema: Check | Section | Items, name: str, secret: bool = False
    ) -> Any:
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
            self.issue(node, name, f"{exc}, got {'(hidden)' if secret else _shown(raw)}")
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
                spec = schema.fields[key]
                values[key] = self.value(value_node, spec.check, full, spec.secret)
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


# ----------------------------------------------------------------------------- derived schemas


def schema_of(
    cls: type,
    *,
    build: Callable[..., Any] | None = None,
    cross: Callable[[dict[str, Any]], list[tuple[str, str]]] | None = None,
    checks: Mapping[str, Check | Section | Items] | None = None,
    exclude: tuple[str, ...] = (),
    shorthand: str | None = None,
) -> Section:
    """The :class:`Section` of dataclass ``cls``: one key per field, with the field's default
    (``REQUIRED`` where :func:`~broadcast_filter.setting.setting` says so), help and a check
    derived from its type hint and bounds; ``checks`` gives the check of fields whose type
    says too little (``build`` defaults to ``cls`` itself)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Field] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        meta = f.metadata
        check = (checks or {}).get(f.name) or meta.get("check") or _check_of(hints[f.name], meta)
        if meta.get("required"):
            default = REQUIRED
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        out[f.name] = Field(check, default, meta.get("help", ""), secret=not f.repr)
    return Section(out, build or cls, cross or (lambda values: []), shorthand)


def _check_of(hint: Any, meta: Mapping[str, Any]) -> Check | Section:
    """The check for a type hint: bool, int, float, str, ``Literal``, ``X | None``, or a
    nested dataclass (its own section)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return optional(_check_of(inner, meta))
    if typing.get_origin(hint) is Literal:
        return choice(*args)
    if hint is bool:
        return boolean
    if hint is int:
        return integer(meta.get("lo"), meta.get("hi"))
    if hint is float:
        return number(meta.get("lo"), meta.get("hi"), open_lo=meta.get("open_lo", False))
    if hint is str:
        return text(empty=meta.get("empty", False))
    if dataclasses.is_dataclass(hint):
        return schema_of(hint)
    raise TypeError(f"no check derived for {hint!r}: give one with setting(check=...)")


def options(v: Any) -> dict[str, Any]:
    """A mapping of option: value (passed on to a source or sink)."""
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise ValueError("expected a mapping of option: value")
    return v


# ----------------------------------------------------------------------------- daemon config


def loras(v: Any) -> tuple[tuple[str, float], ...]:
    """A mapping of LoRA id/path: scale."""
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and is_number(s) for k, s in v.items()
    ):
        raise ValueError("expected a mapping of LoRA id/path: scale (a number)")
    return tuple((k, float(s)) for k, s in v.items())


def model_section(*, overrides: bool = False) -> Section:
    """The ``model:`` keys: :class:`ModelSpec`'s fields with :class:`Acceleration`'s flat
    among them. As a preset's overrides every key is optional (``UNSET`` when absent) and
    the section builds the dict of the keys given."""
    spec = schema_of(ModelSpec, exclude=("accel",), checks={"loras": loras})
    fields = {**spec.fields, **schema_of(Acceleration).fields}
    if overrides:
        unset = {k: dataclasses.replace(f, default=UNSET) for k, f in fields.items()}
        return Section(unset, lambda **v: {k: x for k, x in v.items() if x is not UNSET})
    return Section(fields, lambda **v: ModelSpec().with_overrides(v))


def _resolution(v: Any) -> tuple[int, int]:
    ok = isinstance(v, list) and len(v) == 2
    ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    if not ok or not all(64 <= x <= 2048 and x % 8 == 0 for x in v):
        raise ValueError("expected [width, height], multiples of 8 between 64 and 2048")
    return (v[0], v[1])


def _names(v: Any) -> dict[str, str]:
    ok = isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    )
    if not ok:
        raise ValueError("expected a mapping of OBS name: preset name")
    return dict(v)


def _input_names(v: Any) -> tuple[str, ...]:
    ok = isinstance(v, list) and all(isinstance(x, str) and x for x in v)
    if not ok:
        raise ValueError("expected a list of OBS input names")
    if len(set(v)) != len(v):
        raise ValueError("expected each OBS input name once")
    return tuple(v)


def _obs_cross(values: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    if "password" in values and "password_env" in values:
        problems.append(("password", "give either password or password_env, not both"))
    env = values.get("password_env")
    if env is not None and env not in os.environ:
        problems.append(("password_env", f"environment variable {env} is not set"))
    return problems


def _obs_build(**values: Any) -> ObsSettings:
    if values["password_env"] is not None:
        values["password"] = os.environ[values["password_env"]]
    return ObsSettings(**values)


OBS = schema_of(
    ObsSettings,
    build=_obs_build,
    cross=_obs_cross,
    checks={"scene_presets": _names, "item_presets": _names, "sync_audio": _input_names},
)


def _host_names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        raise ValueError("expected a list of host names")
    return tuple(x.strip().lower() for x in v)


def _api_cross(values: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    if values.get("token") and values.get("token_env"):
        problems.append(("token", "give either token or token_env, not both"))
    env = values.get("token_env")
    if env is not None and not os.environ.get(env):
        problems.append(("token_env", f"environment variable {env} is not set (or empty)"))
    has_token = bool(values.get("token")) or env is not None
    bind = values.get("bind", "127.0.0.1")
    if bind is not None and not is_loopback(bind) and not has_token:
        problems.append(
            (
                "token",
                f"bind {bind} is not a loopback address: set api.token (or api.token_env), "
                "or bind 127.0.0.1",
            )
        )
    return problems


def _api_build(**values: Any) -> ApiSettings:
    if values["token_env"] is not None:
        values["token"] = os.environ[values["token_env"]]
    return ApiSettings(**values)


API = schema_of(
    ApiSettings, build=_api_build, cross=_api_cross, checks={"allowed_hosts": _host_names}
)


@dataclass(frozen=True)
class SourceSettings:
    url: str | None = setting(None, help="device, file, URL, or null")
    fit: Literal["crop", "letterbox", "stretch"] = setting("crop")
    options: dict[str, Any] = setting(factory=dict, check=options)


@dataclass(frozen=True)
class SinkSettings:
    url: str = setting(required=True, help="vcam, null, a file or a URL")
    options: dict[str, Any] = setting(factory=dict, check=options)


@dataclass(frozen=True)
class PresetSettings:
    folder: str = setting("presets", help="relative to this file's folder")
    start: str | None = setting(None, help="preset on air at start")


SINKS = Items(schema_of(SinkSettings, shorthand="url"), 1)
SINKS_HELP = "a list such as [vcam]"


@dataclass(frozen=True)
class StreamSettings:
    """One stream of a multi-stream daemon (``streams:``): its own source, sinks, presets,
    OBS bridge and API; model, resolution and fps are the top level's unless given here
    (``model`` keys override the top-level model's, as in a preset)."""

    name: str = setting("", required=True, help="names the stream on the status line, metrics")
    source: SourceSettings = setting(factory=SourceSettings)
    sinks: tuple[SinkSettings, ...] = setting((), required=True, help=SINKS_HELP, check=SINKS)
    presets: PresetSettings | None = setting(
        None, help="default: the top-level presets", check=schema_of(PresetSettings)
    )
    model: dict[str, Any] = setting(factory=dict, check=model_section(overrides=True))
    resolution: tuple[int, int] | None = setting(None, check=optional(_resolution))
    fps: float | None = setting(None, lo=1, hi=240)
    obs: ObsSettings | None = setting(None, help="this stream's OBS bridge", check=OBS)
    api: ApiSettings | None = setting(None, help="this stream's API and dock", check=API)


def _streams_cross(values: dict[str, Any]) -> list[tuple[str, str]]:
    """Either one stream at the top level (``sinks:``) or a ``streams:`` list."""
    streams = values.get("streams") or ()
    if not streams:
        if not values.get("sinks"):
            return [("sinks", f"missing required field ({SINKS_HELP})")]
        return []
    problems = [
        (key, "with streams:, give it per stream")
        for key in ("source", "sinks", "obs", "api")
        if values.get(key) not in (None, ())
    ]
    names = [s.name for s in streams]
    problems += [
        ("streams", f"stream name {n!r} given twice")
        for n in sorted(set(names))
        if names.count(n) > 1
    ]
    ports = [s.api.port for s in streams if s.api is not None and s.api.port]
    problems += [
        ("streams", f"api.port {p} given to two streams")
        for p in sorted(set(ports))
        if ports.count(p) > 1
    ]
    return problems


@dataclass(frozen=True)
class DaemonConfig:
    """The whole daemon: model, frame size and rate, source, sinks, presets, OBS, safety —
    or, with ``streams:``, several streams on one model (:meth:`stream_configs`).
    Local model paths are absolute, resolved against the config file's folder."""

    path: Path
    model: ModelSpec = setting(required=True, help="id: ...")
    resolution: tuple[int, int] = setting((512, 512), check=_resolution)
    fps: float = setting(30.0, lo=1, hi=240)
    source: SourceSettings = setting(factory=SourceSettings)
    sinks: tuple[SinkSettings, ...] = setting((), help=SINKS_HELP, check=SINKS)
    presets: PresetSettings = setting(factory=PresetSettings)
    obs: ObsSettings | None = setting(None, help="settings of the OBS bridge", check=OBS)
    safety: SafetySettings = setting(factory=SafetySettings, help="on-air safety timings")
    api: ApiSettings | None = setting(None, help="local HTTP/WebSocket API and dock", check=API)
    streams: tuple[StreamSettings, ...] = setting(
        (), help="several streams on one model", check=Items(schema_of(StreamSettings), 1)
    )
    cpu_threads: int = setting(
        0,
        lo=0,
        hi=1024,
        help="torch threads when the model runs on the CPU; 0: every core but one",
    )
    batch_window_ms: float = setting(
        5.0, lo=0, hi=100, help="how long a stream's model call waits for the others'"
    )
    name: str = ""  # the stream's name, in a config of one of several streams

    def stream_configs(self) -> list[DaemonConfig]:
        """One config per stream: this one, or each of ``streams:`` on the top level's
        model, resolution, fps, presets and safety unless the stream gives its own."""
        if not self.streams:
            return [self]
        folder = self.path.parent.absolute()
        return [
            dataclasses.replace(
                self,
                name=s.name,
                model=self.model.with_overrides({**s.model, **resolve_refs(s.model, folder)}),
                resolution=s.resolution or self.resolution,
                fps=s.fps or self.fps,
                source=s.source,
                sinks=s.sinks,
                presets=s.presets or self.presets,
                obs=s.obs,
                api=s.api,
                streams=(),
            )
            for s in self.streams
        ]

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


DAEMON = schema_of(
    DaemonConfig, exclude=("path", "name"), checks={"model": model_section()}, cross=_streams_cross
)


def load_sections(path: str | Path) -> dict[str, Any]:
    """A daemon config's sections by key, checked as :func:`load_config` checks them,
    except that ``model`` and ``sinks`` may be left out (``None``): ``obs setup`` reads its
    ``obs:`` and ``api:`` sections from a file that may hold only those."""
    relaxed = {
        k: dataclasses.replace(f, default=None) if f.default is REQUIRED else f
        for k, f in DAEMON.fields.items()
    }
    return load_section(Path(path), Section(relaxed, lambda **v: v))


def load_config(path: str | Path) -> DaemonConfig:
    """Read and check a daemon YAML file; raise :class:`ConfigError` naming file and line."""
    path = Path(path)
    config = load_section(path, DAEMON, path=path)
    return dataclasses.replace(config, model=config.model.resolved(path.parent.absolute()))
