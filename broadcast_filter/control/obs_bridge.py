"""Drive the daemon from OBS Studio through obs-websocket 5.

The bridge turns OBS events into :class:`~broadcast_filter.control.commands.Commands` calls:
program scene -> preset, a shown scene item in the controls scene -> preset or bypass
(OBS's own "Show '<item>'" hotkeys), ``CustomEvent`` payloads -> commands; and it writes the
daemon's status into a text source. It runs in its own thread, reconnects with backoff and
never blocks the caller: the video path only ever reads :attr:`ObsBridge.state`.

obsws-python 1.8 quirks handled here: an exception in its reader thread (including its own
conversion of odd ``CustomEvent`` keys such as ``__slots__``) or a dead socket ends that
thread silently, so the bridge takes raw event dicts and watches the thread; ``ReqClient``
is not thread-safe, so only the bridge thread uses it; it logs passwords and tracebacks,
so its logger is quieted.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import obsws_python
from obsws_python.error import OBSSDKError, OBSSDKRequestError, OBSSDKTimeoutError
from obsws_python.subs import Subs

from broadcast_filter.control.commands import Commands

log = logging.getLogger(__name__)

#: ``item_presets`` value that toggles bypass instead of switching preset
BYPASS = "bypass"
#: key that marks a ``CustomEvent`` as ours: ``{"broadcast_filter": {...}}``
EVENT_KEY = "broadcast_filter"
SUBSCRIPTIONS = Subs.GENERAL | Subs.SCENES | Subs.SCENEITEMS | Subs.UI
CONNECT_TIMEOUT_S = 3.0
RETRY_FIRST_S = 0.25
AUTH_RETRY_S = 30.0
POLL_S = 0.2

Action = tuple[str, Any]  # ("preset", name) | ("step", n) | ("bypass", bool|None) | ("set", (k, v))


class ObsConfigError(ValueError):
    """The ``obs:`` config section is invalid; the message names the file and field."""


class ObsAuthError(RuntimeError):
    """OBS refused the password; the message names the setting, never the password."""


def quiet_obsws_logging() -> None:
    """obsws-python logs the password at INFO and a traceback per refused connection."""
    logging.getLogger("obsws_python").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class ObsSettings:
    """The daemon config's ``obs:`` section. ``password`` is kept out of ``repr``."""

    host: str = "127.0.0.1"
    port: int = 4455
    password: str = field(default="", repr=False)
    password_env: str | None = None
    scene_presets: Mapping[str, str] = field(default_factory=dict)
    item_presets: Mapping[str, str] = field(default_factory=dict)
    controls_scene: str = "broadcast_filter controls"
    status_source: str | None = "broadcast_filter status"
    status_interval_s: float = 1.0
    warm_preview: bool = True
    output_source: str = "broadcast_filter output"
    output_url: str = "udp://127.0.0.1:23000"
    output_format: str = "mpegts"
    reconnect_max_s: float = 5.0

    @property
    def password_setting(self) -> str:
        """Where the password comes from, for error messages."""
        if self.password_env:
            return f"obs.password_env (environment variable {self.password_env})"
        return "obs.password"

    def connection(self) -> dict[str, Any]:
        """Keyword arguments for obsws-python clients (always explicit: no config.toml)."""
        return {"host": self.host, "port": self.port, "password": self.password}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, source: str) -> ObsSettings:
        """Build from the YAML ``obs:`` mapping; ``source`` (the file) prefixes errors."""
        mapping = dict(mapping or {})

        def fail(key: str, problem: str) -> ObsConfigError:
            return ObsConfigError(f"{source}: obs.{key}: {problem}")

        known = set(cls.__dataclass_fields__)
        for key in mapping:
            if key not in known:
                raise fail(key, f"unknown field (known: {', '.join(sorted(known))})")
        kwargs: dict[str, Any] = {}
        for key in ("host", "controls_scene", "output_source", "output_url", "output_format"):
            if key in mapping:
                kwargs[key] = _check(mapping[key], str, fail, key)
        if "port" in mapping:
            port = _check(mapping["port"], int, fail, "port")
            if not 0 < port < 65536:
                raise fail("port", f"must be 1..65535, got {port}")
            kwargs["port"] = port
        for key in ("status_interval_s", "reconnect_max_s"):
            if key in mapping:
                value = _check(mapping[key], (int, float), fail, key)
                if value <= 0:
                    raise fail(key, f"must be > 0, got {value}")
                kwargs[key] = float(value)
        if "warm_preview" in mapping:
            kwargs["warm_preview"] = _check(mapping["warm_preview"], bool, fail, "warm_preview")
        if "status_source" in mapping:
            value = mapping["status_source"]
            kwargs["status_source"] = (
                None if value is None else _check(value, str, fail, "status_source")
            )
        for key in ("scene_presets", "item_presets"):
            if key in mapping:
                table = _check(mapping[key], dict, fail, key)
                for name, preset in table.items():
                    _check(name, str, fail, key)
                    _check(preset, str, fail, f"{key}.{name}")
                kwargs[key] = dict(table)
        if "password" in mapping and "password_env" in mapping:
            raise fail("password", "give either password or password_env, not both")
        if "password" in mapping:
            kwargs["password"] = _check(mapping["password"], str, fail, "password")
        if "password_env" in mapping:
            env = _check(mapping["password_env"], str, fail, "password_env")
            if env not in os.environ:
                raise fail("password_env", f"environment variable {env} is not set")
            kwargs["password_env"] = env
            kwargs["password"] = os.environ[env]
        return cls(**kwargs)


def _check(value: Any, kind: type | tuple[type, ...], fail: Callable, key: str) -> Any:
    """``value`` if it is of ``kind`` (a bool is not a number here), else a named error."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise fail(key, f"expected {names}, got {type(value).__name__} {value!r}")
    return value


def connect(settings: ObsSettings, client: type = obsws_python.ReqClient, **kwargs: Any) -> Any:
    """Open an obsws-python client. A refused password raises :class:`ObsAuthError` naming
    the setting; an unreachable OBS raises ``OSError`` (e.g. ``ConnectionRefusedError``)."""
    try:
        return client(**settings.connection(), timeout=CONNECT_TIMEOUT_S, **kwargs)
    except OBSSDKTimeoutError:
        raise
    except OBSSDKError:
        raise ObsAuthError(
            f"OBS at {settings.host}:{settings.port} refused the password from "
            f"{settings.password_setting}; it must match OBS's Tools > WebSocket Server "
            "Settings > Server Password"
        ) from None


def parse_custom_event(data: Mapping[str, Any]) -> list[Action] | None:
    """The actions in a ``CustomEvent``'s ``eventData``; ``None`` if it is not ours.

    ``{"broadcast_filter": {"preset": "warm"}}``, ``{"step": 1}``, ``{"bypass": true}`` (or
    ``false`` or ``"toggle"``), ``{"set": {"guidance_scale": 1.4}}``; several keys apply in
    that order. Raises ``ValueError`` naming the problem."""
    if EVENT_KEY not in data:
        return None
    command = data[EVENT_KEY]
    if not isinstance(command, dict) or not command:
        raise ValueError(f"{EVENT_KEY} must be a non-empty object, got {command!r}")
    unknown = set(command) - {"preset", "step", "bypass", "set"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} (use preset, step, bypass, set)")
    actions: list[Action] = []
    if "preset" in command:
        if not isinstance(command["preset"], str):
            raise ValueError(f"preset must be a string, got {command['preset']!r}")
        actions.append(("preset", command["preset"]))
    if "step" in command:
        step = command["step"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an integer, got {step!r}")
        actions.append(("step", step))
    if "bypass" in command:
        bypass = command["bypass"]
        if bypass not in (True, False, "toggle") or not isinstance(bypass, bool | str):
            raise ValueError(f'bypass must be true, false or "toggle", got {bypass!r}')
        actions.append(("bypass", None if bypass == "toggle" else bypass))
    if "set" in command:
        params = command["set"]
        if not isinstance(params, dict) or not params:
            raise ValueError(f"set must be a non-empty object, got {params!r}")
        actions.extend(("set", item) for item in params.items())
    return actions


def format_status(status: Mapping[str, Any]) -> str:
    """One line for the OBS status text source, e.g. ``warm | 29.8 fps | 140 ms``."""
    preset = str(status.get("preset") or "-")
    if status.get("bypass"):
        preset = f"BYPASS ({preset})"
    parts = [preset]
    if isinstance(status.get("fps_out"), int | float):
        parts.append(f"{status['fps_out']:.1f} fps")
    if isinstance(status.get("latency_ms_p50"), int | float):
        parts.append(f"{status['latency_ms_p50']:.0f} ms")
    return " | ".join(parts)


class _Inbox:
    """Stands in for obsws-python's ``Callback``: queues raw ``(event type, data)`` pairs.

    Its own ``Callback`` builds a class per event and can raise on odd keys, which ends the
    reader thread; a ``queue.put`` cannot fail."""

    def __init__(self, inbox: queue.Queue) -> None:
        self._inbox = inbox

    def trigger(self, event_type: str, data: dict) -> None:
        self._inbox.put((event_type, data))


class _ConnectionLost(Exception):
    """The event reader thread ended or OBS announced it is closing."""


class ObsBridge:
    """OBS events -> :class:`Commands`, in a thread of its own; see the module docstring.

    ``state`` is one of ``stopped``, ``connecting``, ``connected``, ``disconnected`` (OBS
    unreachable, retrying with backoff) and ``auth failed`` (retrying every 30 s);
    ``error`` says why in words."""

    def __init__(self, settings: ObsSettings, commands: Commands) -> None:
        self.settings = settings
        self.commands = commands
        self.state = "stopped"
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._req: obsws_python.ReqClient | None = None
        self._events: obsws_python.EventClient | None = None
        self._status_text: str | None = None
        self._status_ok = True

    def start(self) -> ObsBridge:
        """Start the bridge thread and return at once, whether or not OBS is running."""
        if self._thread is None:
            quiet_obsws_logging()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="obs-bridge", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect and end the thread (waits at most ``timeout`` seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.state = "stopped"

    def __enter__(self) -> ObsBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _check_presets(self) -> None:
        """Warn about mapped presets the daemon does not know (they would fail when used)."""
        try:
            known = set(self.commands.preset_names())
        except Exception as err:
            log.warning("commands.preset_names() failed: %s", err)
            return
        for table in ("scene_presets", "item_presets"):
            for key, preset in getattr(self.settings, table).items():
                if preset not in known and not (table == "item_presets" and preset == BYPASS):
                    log.warning("obs.%s.%s: unknown preset %r", table, key, preset)

    def _run(self) -> None:
        self._check_presets()
        delay = RETRY_FIRST_S
        while not self._stop.is_set():
            self.state = "connecting"
            try:
                self._connect()
            except ObsAuthError as err:
                if self.error != str(err):
                    log.error("%s", err)
                self.state, self.error = "auth failed", str(err)
                self._disconnect()
                self._stop.wait(AUTH_RETRY_S)
                continue
            except Exception as err:  # refused, reset, timeout: OBS not there (yet)
                message = f"no OBS websocket at {self.settings.host}:{self.settings.port} ({err})"
                (log.warning if delay == RETRY_FIRST_S else log.debug)("%s; retrying", message)
                self.state, self.error = "disconnected", message
                self._disconnect()
                self._stop.wait(delay)
                delay = min(2 * delay, self.settings.reconnect_max_s)
                continue
            delay = RETRY_FIRST_S
            self.state, self.error = "connected", None
            log.info("connected to OBS at %s:%s", self.settings.host, self.settings.port)
            try:
                self._serve()
            except Exception as err:
                self.error = f"lost the OBS connection ({type(err).__name__}: {err})"
                log.warning("%s; reconnecting", self.error)
            finally:
                self._disconnect()
        self.state = "stopped"

    def _connect(self) -> None:
        """Open both clients, then apply the program scene's preset and warm the preview."""
        self._req = connect(self.settings)
        self._events = connect(self.settings, obsws_python.EventClient, subs=SUBSCRIPTIONS)
        self._events.callback = _Inbox(self._inbox)
        self._status_text, self._status_ok = None, True
        scene = self._req.get_current_program_scene().current_program_scene_name
        self._on_program_scene(scene)
        if self.settings.warm_preview and self._req.get_studio_mode_enabled().studio_mode_enabled:
            self._on_preview_scene(self._req.get_current_preview_scene().current_preview_scene_name)

    def _disconnect(self) -> None:
        """Close both clients. The event socket is read by its own thread, so it gets a close
        frame and a shutdown (its reader then ends) rather than a close handshake."""
        try:
            if self._req is not None:
                self._req.base_client.ws.close(timeout=1)
            if self._events is not None:
                self._events.base_client.ws.send_close()
        except Exception as err:
            log.debug("closing the OBS connection: %s", err)
        if self._events is not None:
            self._events.base_client.ws.shutdown()
        self._req = self._events = None
        self._inbox = queue.Queue()

    def _serve(self) -> None:
        """Handle events and refresh the status until the connection ends or stop()."""
        assert self._events is not None and self._req is not None
        next_status = 0.0
        while not self._stop.is_set():
            if not self._events.worker.is_alive():
                raise _ConnectionLost("the OBS event connection ended")
            try:
                event_type, data = self._inbox.get(timeout=POLL_S)
            except queue.Empty:
                pass
            else:
                if event_type == "ExitStarted":
                    raise _ConnectionLost("OBS is closing")
                try:
                    if self._on_event(event_type, data):
                        next_status = min(next_status, time.monotonic() + 0.1)
                except OBSSDKRequestError as err:  # OBS said no; the connection is fine
                    log.warning("handling %s: %s", event_type, err)
            if time.monotonic() >= next_status:
                self._update_status()
                next_status = time.monotonic() + self.settings.status_interval_s

    def _on_event(self, event_type: str, data: dict) -> bool:
        """Act on one event; True when it changed something in the daemon."""
        if event_type == "CurrentProgramSceneChanged":
            return self._on_program_scene(data.get("sceneName", ""))
        if event_type == "CurrentPreviewSceneChanged":
            self._on_preview_scene(data.get("sceneName", ""))
        elif event_type == "SceneItemEnableStateChanged" and data.get("sceneItemEnabled"):
            return self._on_item_shown(data.get("sceneName", ""), data.get("sceneItemId", -1))
        elif event_type == "CustomEvent":
            try:
                actions = parse_custom_event(data)
            except ValueError as err:
                log.warning("ignored CustomEvent %.200r: %s", data, err)
                return False
            return actions is not None and all([self._apply(a, "CustomEvent") for a in actions])
        return False

    def _on_program_scene(self, scene: str) -> bool:
        preset = self.settings.scene_presets.get(scene)
        return preset is not None and self._apply(("preset", preset), f"scene {scene!r}")

    def _on_preview_scene(self, scene: str) -> None:
        """Studio mode: let the daemon prepare the preview scene's preset before the cut."""
        preset = self.settings.scene_presets.get(scene)
        prepare = getattr(self.commands, "prepare_preset", None)
        if self.settings.warm_preview and preset is not None and callable(prepare):
            self._call(f"preview scene {scene!r}: prepare_preset({preset!r})", prepare, preset)

    def _on_item_shown(self, scene: str, item_id: int) -> bool:
        """A controls-scene item was shown (its hotkey): act, then hide it to re-arm the key."""
        if scene != self.settings.controls_scene or self._req is None:
            return False
        items = self._req.get_scene_item_list(scene).scene_items
        source = next((i["sourceName"] for i in items if i["sceneItemId"] == item_id), None)
        target = self.settings.item_presets.get(source or "")
        if target is None:
            return False
        action = ("bypass", None) if target == BYPASS else ("preset", target)
        done = self._apply(action, f"item {source!r}")
        self._req.set_scene_item_enabled(scene, item_id, False)
        return done

    def _apply(self, action: Action, why: str) -> bool:
        kind, arg = action
        if kind == "preset":
            return self._call(f"{why}: apply_preset({arg!r})", self.commands.apply_preset, arg)
        if kind == "step":
            return self._call(f"{why}: step_preset({arg})", self.commands.step_preset, arg)
        if kind == "bypass":
            return self._call(f"{why}: set_bypass({arg})", self.commands.set_bypass, arg)
        name, value = arg
        return self._call(f"{why}: set_param({name!r}, {value!r})", self.commands.set_param, *arg)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> bool:
        """Call into the daemon; a failure is logged, never raised into the bridge."""
        try:
            fn(*args)
        except Exception as err:
            log.error("%s failed: %s: %s", what, type(err).__name__, err)
            return False
        log.info("%s", what)
        return True

    def _update_status(self) -> None:
        """Write the status text if it changed; otherwise ping, to notice a dead link."""
        assert self._req is not None
        source = self.settings.status_source
        text = None
        try:
            text = format_status(self.commands.status())
        except Exception as err:
            log.error("commands.status() failed: %s: %s", type(err).__name__, err)
        if source is None or not self._status_ok or text is None or text == self._status_text:
            self._req.get_version()
            return
        try:
            self._req.set_input_settings(source, {"text": text}, True)
            self._status_text = text
        except OBSSDKRequestError as err:
            self._status_ok = False
            log.warning(
                "cannot write status to OBS source %r (%s); run `broadcast-filter obs setup`",
                source,
                err,
            )
