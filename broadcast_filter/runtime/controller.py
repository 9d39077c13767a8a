"""The controller: what the engine does with each frame, and the daemon's :class:`Commands`.

Control surfaces (OBS, the CLI, an API) call the ``Commands`` methods from their own threads;
each call only records the wish under a lock (the newest wish wins: nothing queues up). The
engine thread calls :meth:`Controller.process` once per frame, which applies the wishes at
that frame boundary and then styles the frame, passes it through, or re-emits the last
output. A preset on another model is loaded in a background thread while frames pass through.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from broadcast_filter.control.config import ModelSettings
from broadcast_filter.control.presets import Change, Preset, PresetLibrary, with_param
from broadcast_filter.media.base import Frame
from broadcast_filter.runtime.engine import Engine, EngineError
from broadcast_filter.runtime.telemetry import Telemetry

EngineLoader = Callable[[ModelSettings, Preset], Engine]


@dataclass(frozen=True)
class Output:
    """One frame for the sinks, with the capture time of the input it came from."""

    image: np.ndarray
    captured_at: float
    kind: str  # "model", "skip" (SSF re-emit) or "pass" (input passed through)


class Controller:
    """Implements :class:`~broadcast_filter.control.commands.Commands` for the daemon."""

    def __init__(
        self,
        library: PresetLibrary,
        start: Preset,
        engine: Engine | None,
        base_model: ModelSettings,
        load: EngineLoader,
        telemetry: Telemetry,
        log: Callable[[str], None],
    ) -> None:
        self.library = library
        self.base_model = base_model
        self.telemetry = telemetry
        self._load, self._log = load, log
        self._lock = threading.Lock()  # guards the wishes below and the library
        self._pending: Preset | None = None
        self._warm: Preset | None = None
        self._bypass = False
        self._loaded: Engine | None = None
        self._load_error: tuple[ModelSettings, str] | None = None
        self._loading: ModelSettings | None = None
        self._failed: set[ModelSettings] = set()
        self.active = start
        self.previous = start
        self.engine = engine
        self.mode = "starting"
        self._engine_failed = False
        self._restart: str | None = None
        #: the last frame's engine failure (``None`` after a good frame), for the watchdog
        self.fault: EngineError | None = None

    # ------------------------------------------------------------------ Commands

    def apply_preset(self, name: str) -> None:
        with self._lock:
            preset = self.library.get(name)
            self._pending = preset

    def step_preset(self, offset: int) -> str:
        with self._lock:
            names = self.library.names()
            current = (self._pending or self.active).name
            index = names.index(current) if current in names else -1
            name = names[(index + offset) % len(names)]
            self._pending = self.library.get(name)
            return name

    def set_bypass(self, on: bool | None) -> bool:
        with self._lock:
            self._bypass = not self._bypass if on is None else bool(on)
            return self._bypass

    def set_param(self, name: str, value: Any) -> None:
        with self._lock:
            self._pending = with_param(self._pending or self.active, name, value)

    def preset_names(self) -> list[str]:
        with self._lock:
            return self.library.names()

    def prepare_preset(self, name: str) -> None:
        """Warm a preset before it goes on air (OBS studio mode's preview scene): its prompt is
        encoded at the next frame boundary, so the cut itself needs no text-encoder call."""
        with self._lock:
            self._warm = self.library.get(name)

    def status(self) -> dict[str, Any]:
        return self.telemetry.snapshot(time.monotonic()).as_dict()

    def restart_engine(self, reason: str) -> None:
        """Drop the engine at the next frame boundary and rebuild it in the background
        (frames pass through meanwhile); sources and sinks are not touched."""
        with self._lock:
            self._restart = reason

    # ------------------------------------------------------------------ hot reload

    def reload_presets(self) -> list[Change]:
        """Rescan the presets folder; an edited active preset is re-applied (crossfading)."""
        with self._lock:
            changes = self.library.scan()
            for change in changes:
                active = change.kind == "updated" and change.name == self.active.name
                if active and (self._pending is None or self._pending.name == change.name):
                    self._pending = self.library.get(change.name)
        return changes

    # ------------------------------------------------------------------ per frame

    def process(self, frame: Frame, now: float) -> Output:
        """Apply pending changes at this frame boundary, then produce this frame's output."""
        with self._lock:
            pending, self._pending = self._pending, None
            bypass = self._bypass
            loaded, self._loaded = self._loaded, None
            load_error, self._load_error = self._load_error, None
            restart, self._restart = self._restart, None
            warm, self._warm = self._warm, None
        if warm is not None and not warm.bypass and self._engine_ready(warm):
            self.engine.pipe.encode_prompt(warm.prompt, warm.negative_prompt)
        if restart is not None and self.engine is not None and self._loading is None:
            self._log(f"restarting the engine ({restart}); passing frames through meanwhile")
            self._failed.discard(self.engine.settings)
            self.engine = None
            self._engine_failed = False
        if pending is not None:
            self._switch(pending, now)
        if load_error is not None:
            self._load_failed(*load_error, now)
        if loaded is not None:
            self._adopt(loaded)
        output = self._run(frame, now, bypass)
        self.telemetry.set_state(preset=self.active.name, mode=self.mode, bypass=bypass)
        return output

    def _switch(self, preset: Preset, now: float) -> None:
        if preset.name != self.active.name:
            self.previous = self.active
        self.active = preset
        if not preset.bypass and self._engine_ready(preset):
            self.engine.switch(preset, now)

    def _wanted(self, preset: Preset) -> ModelSettings:
        return preset.model_settings(self.base_model)

    def _engine_ready(self, preset: Preset) -> bool:
        return self.engine is not None and self.engine.settings == self._wanted(preset)

    def _adopt(self, engine: Engine) -> None:
        if engine.settings == self._wanted(self.active) and not self.active.bypass:
            self.engine = engine
            self._log(f"model {engine.settings.id} loaded; preset {self.active.name!r} is live")

    def _load_failed(self, settings: ModelSettings, error: str, now: float) -> None:
        self._failed.add(settings)
        self._log(f"could not load model {settings.id}: {error}")
        if self._wanted(self.active) == settings and self._engine_ready(self.previous):
            self._log(f"back to preset {self.previous.name!r}")
            self._switch(self.previous, now)

    def _start_loading(self, settings: ModelSettings, preset: Preset) -> None:
        self._loading = settings
        self._log(f"preset {preset.name!r} needs model {settings.id}: loading, passing through")

        def load() -> None:
            try:
                engine = self._load(settings, preset)
            except Exception as exc:  # reported on the status line; the stream goes on
                with self._lock:
                    self._load_error = (settings, str(exc) or repr(exc))
            else:
                with self._lock:
                    self._loaded = engine
            finally:
                self._loading = None

        threading.Thread(target=load, name="model-loader", daemon=True).start()

    def _run(self, frame: Frame, now: float, bypass: bool) -> Output:
        preset = self.active
        self.fault = None
        if bypass or preset.bypass:
            self.mode = "bypass" if bypass else "passthrough"
            return Output(frame.image, frame.captured_at, "pass")
        if not self._engine_ready(preset):
            settings = self._wanted(preset)
            if settings in self._failed:
                self.mode = f"model {settings.id} failed to load (passthrough)"
            else:
                if self._loading is None:
                    self._start_loading(settings, preset)
                self.mode = f"loading {settings.id} (passthrough)"
            return Output(frame.image, frame.captured_at, "pass")
        try:
            image, skipped = self.engine.process(frame.image, now)
        except EngineError as exc:
            self.fault = exc
            if not self._engine_failed:
                self._log(f"{exc}; passing frames through until the model recovers")
            self._engine_failed = True
            self.mode = "engine error (passthrough)"
            return Output(frame.image, frame.captured_at, "pass")
        if self._engine_failed:
            self._log("model recovered")
            self._engine_failed = False
        self.telemetry.model_step(now, skipped)
        self.mode = "crossfade" if self.engine.fading else "styled"
        return Output(image, frame.captured_at, "skip" if skipped else "model")
