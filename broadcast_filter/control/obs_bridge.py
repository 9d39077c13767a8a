"""Drive the daemon from OBS Studio through obs-websocket 5.

The bridge turns OBS events into :class:`~broadcast_filter.control.commands.Commands` calls:
program scene -> preset, a shown scene item in the controls scene -> preset or bypass
(OBS's own "Show '<item>'" hotkeys), ``CustomEvent`` payloads -> commands; and it writes the
daemon's status into a text source. With ``sync_audio``, it holds OBS's audio inputs (the
microphone) back by the daemon's lasting video delay, so they stay in sync with the filtered
picture arriving through a virtual camera or NDI, and puts the offsets back when it stops.
It runs in its own thread, reconnects with backoff and never blocks the caller: the video
path only ever reads :attr:`ObsBridge.state` (or :attr:`ObsBridge.text`).

obsws-python 1.8 quirks handled here: an exception in its reader thread (including its own
conversion of odd ``CustomEvent`` keys such as ``__slots__``) or a dead socket ends that
thread silently, so the bridge takes raw event dicts and watches the thread; ``ReqClient``
is not thread-safe, so only the bridge thread uses it; it logs passwords and tracebacks,
so its logger is quieted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import obsws_python
from obsws_python.error import OBSSDKError, OBSSDKRequestError, OBSSDKTimeoutError
from obsws_python.subs import Subs

from broadcast_filter.backoff import Backoff
from broadcast_filter.control.commands import Commands
from broadcast_filter.control.obs_settings import ObsSettings

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
#: obs-websocket's bounds on ``inputAudioSyncOffset`` (ms)
SYNC_MIN_MS, SYNC_MAX_MS = -950, 20000
#: how often an unusable ``sync_audio`` input (missing, no audio) is tried again
SYNC_RETRY_S = 5.0
#: obs-websocket status codes for an input that is missing or has no audio
NO_SOURCE, NO_AUDIO = 600, 604
#: put in the inbox by stop(): wakes the bridge at once (it restores offsets before leaving)
WAKE = "_BridgeStopping"


class ObsAuthError(RuntimeError):
    """OBS refused the password; the message names the setting, never the password."""


def quiet_obsws_logging() -> None:
    """obsws-python logs the password at INFO and a traceback per refused connection."""
    logging.getLogger("obsws_python").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class Call:
    """One :class:`Commands` call, e.g. ``Call("apply_preset", ("warm",))``; calling it with
    the commands object performs it, ``str()`` shows it for the log."""

    method: str
    args: tuple[Any, ...] = ()

    def __call__(self, commands: Commands) -> Any:
        return getattr(commands, self.method)(*self.args)

    def __str__(self) -> str:
        return f"{self.method}({', '.join(map(repr, self.args))})"


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


def parse_custom_event(data: Mapping[str, Any]) -> list[Call] | None:
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
    calls: list[Call] = []
    if "preset" in command:
        if not isinstance(command["preset"], str):
            raise ValueError(f"preset must be a string, got {command['preset']!r}")
        calls.append(Call("apply_preset", (command["preset"],)))
    if "step" in command:
        step = command["step"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an integer, got {step!r}")
        calls.append(Call("step_preset", (step,)))
    if "bypass" in command:
        bypass = command["bypass"]
        if bypass not in (True, False, "toggle") or not isinstance(bypass, bool | str):
            raise ValueError(f'bypass must be true, false or "toggle", got {bypass!r}')
        calls.append(Call("set_bypass", (None if bypass == "toggle" else bypass,)))
    if "set" in command:
        params = command["set"]
        if not isinstance(params, dict) or not params:
            raise ValueError(f"set must be a non-empty object, got {params!r}")
        calls.extend(Call("set_param", item) for item in params.items())
    return calls


def sync_ms(delay: float) -> int:
    """The audio sync offset (ms, within OBS's bounds) for a video delay in seconds."""
    return max(SYNC_MIN_MS, min(SYNC_MAX_MS, round(delay * 1000)))


def format_sync(offsets: Mapping[str, int], unusable: Mapping[str, str]) -> str:
    """``Mic/Aux sync +420 ms``: the offsets set (inputs with the same one together) and why
    others could not be set, e.g. ``Mic/Aux sync +420 ms, 'Mic 2' missing``."""
    by_value: dict[int, list[str]] = {}
    for name, ms in offsets.items():
        by_value.setdefault(ms, []).append(name)
    parts = [f"{', '.join(names)} sync {ms:+d} ms" for ms, names in by_value.items()]
    parts += [f"{name!r} {why}" for name, why in unusable.items()]
    return ", ".join(parts)


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
    ``error`` says why in words; :attr:`text` adds the audio sync offsets set.

    ``delay`` returns the daemon's lasting video delay in seconds (``None`` before the first
    frame went out); the inputs in ``settings.sync_audio`` get it as their sync offset."""

    def __init__(
        self,
        settings: ObsSettings,
        commands: Commands,
        delay: Callable[[], float | None] | None = None,
    ) -> None:
        self.settings = settings
        self.commands = commands
        self.delay = delay
        self.state = "stopped"
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._req: obsws_python.ReqClient | None = None
        self._events: obsws_python.EventClient | None = None
        self._status_text: str | None = None
        self._status_ok = True
        #: sync offsets found before the first set, kept across reconnects (restored at stop)
        self._sync_original: dict[str, int] = {}
        #: offsets set on this connection; inputs that could not be set: why, next retry time
        self._sync_set: dict[str, int] = {}
        self._sync_unusable: dict[str, tuple[str, float]] = {}
        self._sync_told: set[str] = set()
        self._sync_text = ""

    @property
    def text(self) -> str:
        """The state for the status line, with the sync offsets set while connected, e.g.
        ``connected, Mic/Aux sync +420 ms``."""
        state, sync = self.state, self._sync_text
        return f"{state}, {sync}" if sync and state == "connected" else state

    def start(self) -> ObsBridge:
        """Start the bridge thread and return at once, whether or not OBS is running."""
        if self._thread is None:
            quiet_obsws_logging()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="obs-bridge", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Restore the audio sync offsets, disconnect and end the thread (waits at most
        ``timeout`` seconds)."""
        self._stop.set()
        self._inbox.put((WAKE, {}))
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
        backoff = Backoff(RETRY_FIRST_S, max(RETRY_FIRST_S, self.settings.reconnect_max_s))
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
                (log.warning if backoff.attempt == 0 else log.debug)("%s; retrying", message)
                self.state, self.error = "disconnected", message
                self._disconnect()
                self._stop.wait(backoff.step())
                continue
            backoff.reset()
            self.state, self.error = "connected", None
            log.info("connected to OBS at %s:%s", self.settings.host, self.settings.port)
            try:
                self._serve()
                self._restore_sync()  # stopping, still connected
            except Exception as err:
                self.error = f"lost the OBS connection ({type(err).__name__}: {err})"
                log.warning("%s; reconnecting", self.error)
            finally:
                self._disconnect()
        for name, ms in self._sync_original.items():
            log.warning(
                "could not restore the sync offset of OBS input %r to %+d ms: OBS is not "
                "connected; set it back in OBS (Edit > Advanced Audio Properties)",
                name,
                ms,
            )
        self.state = "stopped"

    def _connect(self) -> None:
        """Open both clients, then apply the program scene's preset and warm the preview."""
        self._req = connect(self.settings)
        self._events = connect(self.settings, obsws_python.EventClient, subs=SUBSCRIPTIONS)
        self._events.callback = _Inbox(self._inbox)
        self._status_text, self._status_ok = None, True
        self._sync_set, self._sync_unusable, self._sync_text = {}, {}, ""
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
            # wake for the status deadline too (a changed preset shows ~0.1 s after the event)
            wait = min(POLL_S, max(0.0, next_status - time.monotonic()))
            try:
                event_type, data = self._inbox.get(timeout=wait)
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
            self._sync_audio()
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
            return actions is not None and all([self._call(a, "CustomEvent") for a in actions])
        return False

    def _on_program_scene(self, scene: str) -> bool:
        preset = self.settings.scene_presets.get(scene)
        return preset is not None and self._call(
            Call("apply_preset", (preset,)), f"scene {scene!r}"
        )

    def _on_preview_scene(self, scene: str) -> None:
        """Studio mode: let the daemon prepare the preview scene's preset before the cut."""
        preset = self.settings.scene_presets.get(scene)
        if self.settings.warm_preview and preset is not None:
            self._call(Call("prepare_preset", (preset,)), f"preview scene {scene!r}")

    def _on_item_shown(self, scene: str, item_id: int) -> bool:
        """A controls-scene item was shown (its hotkey): act, then hide it to re-arm the key."""
        if scene != self.settings.controls_scene or self._req is None:
            return False
        items = self._req.get_scene_item_list(scene).scene_items
        source = next((i["sourceName"] for i in items if i["sceneItemId"] == item_id), None)
        target = self.settings.item_presets.get(source or "")
        if target is None:
            return False
        call = Call("set_bypass", (None,)) if target == BYPASS else Call("apply_preset", (target,))
        done = self._call(call, f"item {source!r}")
        self._req.set_scene_item_enabled(scene, item_id, False)
        return done

    def _call(self, call: Call, why: str) -> bool:
        """Call into the daemon; a failure is logged, never raised into the bridge."""
        try:
            call(self.commands)
        except Exception as err:
            log.error("%s: %s failed: %s: %s", why, call, type(err).__name__, err)
            return False
        log.info("%s: %s", why, call)
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

    def _sync_audio(self) -> None:
        """Set each ``sync_audio`` input's offset to the lasting video delay, when it differs
        from what was set; the first time, remember the offset the input had."""
        assert self._req is not None
        delay = self.delay() if self.settings.sync_audio and self.delay is not None else None
        if delay is None:
            return
        target, now, changed = sync_ms(delay), time.monotonic(), False
        for name in self.settings.sync_audio:
            retry = self._sync_unusable.get(name, ("", 0.0))[1]
            if self._sync_set.get(name) == target or retry > now:
                continue
            try:
                if name not in self._sync_original:
                    got = self._req.get_input_audio_sync_offset(name)
                    self._sync_original[name] = got.input_audio_sync_offset
                self._req.set_input_audio_sync_offset(name, target)
            except OBSSDKRequestError as err:
                why = {NO_SOURCE: "missing", NO_AUDIO: "no audio"}.get(err.code, "refused")
                changed = changed or self._sync_unusable.get(name, ("",))[0] != why
                self._sync_unusable[name] = (why, now + SYNC_RETRY_S)
                self._sync_set.pop(name, None)
                self._tell_unusable(name, err)
                continue
            if name in self._sync_set:
                why = f"was {self._sync_set[name]:+d} ms: the video delay changed"
            else:
                why = f"the video delay; {self._sync_original[name]:+d} ms is put back at exit"
            log.info("OBS input %r: audio sync offset %+d ms (%s)", name, target, why)
            self._sync_set[name] = target
            self._sync_unusable.pop(name, None)
            changed = True
        if changed:
            unusable = {name: why for name, (why, _) in self._sync_unusable.items()}
            self._sync_text = format_sync(self._sync_set, unusable)

    def _tell_unusable(self, name: str, err: OBSSDKRequestError) -> None:
        """Say once why a ``sync_audio`` input cannot be set (it is tried again later)."""
        if name in self._sync_told:
            return
        self._sync_told.add(name)
        assert self._req is not None
        if err.code == NO_SOURCE:
            try:
                names = [i["inputName"] for i in self._req.get_input_list().inputs]
            except OBSSDKRequestError:
                names = []
            why = f"OBS has no input named {name!r} (its inputs: {', '.join(names) or 'none'})"
        elif err.code == NO_AUDIO:
            why = f"OBS input {name!r} has no audio"
        else:
            why = f"OBS refused to set the sync offset of {name!r} ({err})"
        log.warning("obs.sync_audio: %s; left alone, tried again every %g s", why, SYNC_RETRY_S)

    def _restore_sync(self) -> None:
        """Put back the sync offsets the inputs had before the bridge first set them."""
        assert self._req is not None
        for name, ms in list(self._sync_original.items()):
            try:
                self._req.set_input_audio_sync_offset(name, ms)
            except OBSSDKRequestError as err:
                log.warning("could not restore the sync offset of %r to %+d ms: %s", name, ms, err)
            else:
                log.info("OBS input %r: audio sync offset put back to %+d ms", name, ms)
            del self._sync_original[name]
        self._sync_set, self._sync_text = {}, ""
