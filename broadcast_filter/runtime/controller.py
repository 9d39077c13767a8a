"""The controller: what the engine does with each frame, and the daemon's :class:`Commands`.

Control surfaces (OBS, the CLI, an API) call the ``Commands`` methods from their own threads;
each call only records the wish under a lock (the newest wish wins: nothing queues up). The
engine thread calls :meth:`Controller.process` once per frame, which applies the wishes at
that frame boundary and then styles the frame (or re-emits the last output), or says that
nothing was styled and why; what goes on air is decided in one place,
:mod:`broadcast_filter.runtime.on_air`. A preset on another model is loaded in a background
thread while frames pass through.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from broadcast_filter.control.presets import (
    LIVE_FIELDS,
    Change,
    Preset,
    PresetLibrary,
    with_param,
)
from broadcast_filter.diffusion.spec import ModelSpec
from broadcast_filter.media.base import Frame
from broadcast_filter.runtime.engine import Engine, EngineError
from broadcast_filter.runtime.telemetry import Telemetry
from broadcast_filter.runtime.watchdog import classify

EngineLoader = Callable[[ModelSpec, Preset], Engine]


@dataclass(frozen=True)
class Result:
    """What the engine made of one frame. ``image`` is the styled picture, or ``None`` when
    nothing was styled (bypass, a model loading, a failure): then the input goes on air.
    ``captured_at`` is when what it shows was captured: with Stream Batch the model's output
    is of a frame that entered a call or more ago. ``fault`` is this call's engine failure,
    classified (``None`` after a good call)."""

    image: np.ndarray | None
    captured_at: float
    kind: str  # "model", "skip" (SSF re-emit) or "pass" (nothing styled)
    fault: str | None = None


class Controller:
    """Implements :class:`~broadcast_filter.control.commands.Commands` for the daemon."""

    def __init__(
        self,
        library: PresetLibrary,
        start: Preset,
        engine: Engine | None,
        base_model: ModelSpec,
        load: EngineLoader,
        telemetry: Telemetry,
        log: Callable[[str], None],
        on_restart: Callable[[Engine], object] = lambda engine: None,
    ) -> None:
        """``on_restart(engine)`` is told of an engine dropped for a restart (shared models
        are then reloaded, once for all streams)."""
        self.library = library
        self.base_model = base_model
        self.telemetry = telemetry
        self._load, self._log, self._on_restart = load, log, on_restart
        self._lock = threading.Lock()  # guards the wishes below and the library
        self._pending: Preset | None = None
        self._warm: Preset | None = None
        self._bypass = False
        self._loaded: Engine | None = None
        self._load_error: tuple[ModelSpec, str] | None = None
        self._loading: ModelSpec | None = None
        self._failed: set[ModelSpec] = set()
        self.active = start
        self.previous = start
        self._wanted = start.model_spec(base_model)  # the model self.active runs on
        self.engine = engine
        self.mode = "starting"
        self._engine_failed = False
        #: capture times of the frames the model took last, newest last (what its output shows)
        self._entered: deque[float] = deque(maxlen=8)
        self._restart: str | None = None
        self._source_changed = False
        self._details: Callable[[], dict[str, Any]] = dict
        self._preview: Callable[[], np.ndarray | None] = lambda: None

    def attach(
        self,
        details: Callable[[], dict[str, Any]],
        preview: Callable[[], np.ndarray | None],
    ) -> None:
        """The running daemon's part of :meth:`status` (sinks, health, extra fields) and
        of :meth:`preview` (its last output picture)."""
        self._details, self._preview = details, preview

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

    def set_params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(values, Mapping) or not values:
            raise ValueError("expected at least one parameter")
        with self._lock:
            preset = self._pending or self.active
            for name, value in values.items():
                preset = with_param(preset, name, value)  # raises before anything is kept
            self._pending = preset
            return live_values(preset)

    def preset_names(self) -> list[str]:
        with self._lock:
            return self.library.names()

    def presets(self) -> list[dict[str, Any]]:
        with self._lock:
            active = (self._pending or self.active).name
            listing = []
            for name in self.library.names():
                preset = self.library.get(name)
                spec = preset.model_spec(self.base_model)
                listing.append(
                    {
                        "name": name,
                        "description": preset.description,
                        "active": name == active,
                        "needs_reload": spec != self.base_model,
                        "bypass": preset.bypass,
                    }
                )
            return listing

    def preview(self) -> np.ndarray | None:
        return self._preview()

    def prepare_preset(self, name: str) -> None:
        """Warm a preset before it goes on air (OBS studio mode's preview scene): its prompt is
        encoded at the next frame boundary, so the cut itself needs no text-encoder call."""
        with self._lock:
            self._warm = self.library.get(name)

    def status(self) -> dict[str, Any]:
        snapshot = self.telemetry.snapshot(time.monotonic()).as_dict()
        buckets, total = self.telemetry.latency_histogram()
        snapshot["latency_histogram"] = {
            "buckets_s": [b for b, _ in buckets[:-1]],
            "counts": [c for _, c in buckets],  # cumulative; the last is +Inf (all)
            "sum_s": total,
        }
        with self._lock:
            wanted = self._pending or self.active
            requested = {
                "requested": wanted.name,
                "bypass_requested": self._bypass,
                "params": live_values(wanted),
            }
        return {**snapshot, **self._details(), **requested}

    def restart_engine(self, reason: str) -> None:
        """Drop the engine at the next frame boundary and rebuild it in the background
        (frames pass through meanwhile); sources and sinks are not touched."""
        with self._lock:
            self._restart = reason

    def source_changed(self) -> None:
        """The source was lost and is back: at the next frame boundary the engine forgets
        its temporal state (feedback, previous output, attention cache)."""
        with self._lock:
            self._source_changed = True

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

    def process(self, frame: Frame, now: float) -> Result:
        """Apply pending changes at this frame boundary, then produce this frame's output."""
        with self._lock:
            pending, self._pending = self._pending, None
            bypass = self._bypass
            loaded, self._loaded = self._loaded, None
            load_error, self._load_error = self._load_error, None
            restart, self._restart = self._restart, None
            warm, self._warm = self._warm, None
            source_changed, self._source_changed = self._source_changed, False
        if source_changed and self.engine is not None:
            self.engine.reset()
        if warm is not None and not warm.bypass and self._runs_on(warm.model_spec(self.base_model)):
            self.engine.pipe.encode_prompt(warm.prompt, warm.negative_prompt)
        if restart is not None and self.engine is not None and self._loading is None:
            self._log(f"restarting the engine ({restart}); passing frames through meanwhile")
            self._failed.discard(self.engine.spec)
            self._on_restart(self.engine)
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
        self._wanted = preset.model_spec(self.base_model)
        if not preset.bypass and self._runs_on(self._wanted):
            self.engine.switch(preset, now)

    def _runs_on(self, spec: ModelSpec) -> bool:
        """Whether the loaded engine is the model ``spec`` names."""
        return self.engine is not None and self.engine.spec == spec

    def _adopt(self, engine: Engine) -> None:
        if engine.spec == self._wanted and not self.active.bypass:
            self.engine = engine
            self._log(f"model {engine.spec.id} loaded; preset {self.active.name!r} is live")

    def _load_failed(self, spec: ModelSpec, error: str, now: float) -> None:
        self._failed.add(spec)
        self._log(f"could not load model {spec.id}: {error}")
        previous = self.previous.model_spec(self.base_model)
        if self._wanted == spec and self._runs_on(previous):
            self._log(f"back to preset {self.previous.name!r}")
            self._switch(self.previous, now)

    def _start_loading(self, spec: ModelSpec, preset: Preset) -> None:
        self._loading = spec
        self._log(f"preset {preset.name!r} needs model {spec.id}: loading, passing through")

        def load() -> None:
            try:
                engine = self._load(spec, preset)
            except Exception as exc:  # reported on the status line; the stream goes on
                with self._lock:
                    self._load_error = (spec, str(exc) or repr(exc))
            else:
                with self._lock:
                    self._loaded = engine
            finally:
                self._loading = None

        threading.Thread(target=load, name="model-loader", daemon=True).start()

    def _run(self, frame: Frame, now: float, bypass: bool) -> Result:
        preset = self.active
        passed = Result(None, frame.captured_at, "pass")
        if bypass or preset.bypass:
            self.mode = "bypass" if bypass else "passthrough"
            return passed
        if not self._runs_on(self._wanted):
            spec = self._wanted
            if spec in self._failed:
                self.mode = f"model {spec.id} failed to load (passthrough)"
            else:
                if self._loading is None:
                    self._start_loading(spec, preset)
                self.mode = f"loading {spec.id} (passthrough)"
            return passed
        try:
            image, skipped = self.engine.process(frame.image, now)
        except EngineError as exc:
            if not self._engine_failed:
                self._log(f"{exc}; passing frames through until the model recovers")
            self._engine_failed = True
            self.mode = "engine error (passthrough)"
            return Result(None, frame.captured_at, "pass", classify(exc))
        if self._engine_failed:
            self._log("model recovered")
            self._engine_failed = False
        self.telemetry.model_step(now, skipped)
        self.mode = "crossfade" if self.engine.fading else "styled"
        if skipped:  # similar to the last frame the model took: shown as current
            return Result(image, frame.captured_at, "skip")
        self._entered.append(frame.captured_at)
        shows = self._entered[max(0, len(self._entered) - 1 - self.engine.lag)]
        return Result(image, shows, "model")


def live_values(preset: Preset) -> dict[str, Any]:
    """The preset's live parameters as plain JSON values."""
    values = {name: getattr(preset, name) for name in LIVE_FIELDS}
    values["t_index_list"] = list(preset.t_index_list)
    values.update({f"temporal.{k}": v for k, v in dataclasses.asdict(preset.temporal).items()})
    return values
