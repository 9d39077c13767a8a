"""The engine: a :class:`StreamPipeline` applied to video frames, with crossfades and SSF.

Frames come in and go out as ``(H, W, 3)`` uint8 RGB numpy arrays (the media contract); the
conversion to and from the pipeline's ``(1, 3, H, W)`` float tensors in ``[0, 1]`` goes
through buffers allocated once. Preset switches crossfade the prompt embeddings, guidance
and delta (see :mod:`broadcast_filter.control.transitions`); nothing is rebuilt.
No threads here: the runtime calls :meth:`Engine.process` from its engine thread. Several
streams share one model through :class:`SharedModels` (each stream its own pipeline) and a
runner that shares their model calls (:class:`~broadcast_filter.runtime.batcher.Batcher`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from broadcast_filter.control.presets import Preset, SsfSettings
from broadcast_filter.control.transitions import Crossfade
from broadcast_filter.diffusion.accel import accelerate, warm_up
from broadcast_filter.diffusion.batch import Step, drive
from broadcast_filter.diffusion.models import ModelBundle, load_models
from broadcast_filter.diffusion.similarity import SimilarityFilter
from broadcast_filter.diffusion.spec import ModelSpec
from broadcast_filter.diffusion.stream import PromptEmbeds, StreamConfig, StreamPipeline
from broadcast_filter.runtime.frames import FrameTransfer


class EngineError(RuntimeError):
    """The model failed on a frame (or produced non-finite values); the frame is passed on."""


def stream_config(preset: Preset, width: int, height: int) -> StreamConfig:
    return StreamConfig(
        width=width,
        height=height,
        t_index_list=preset.t_index_list,
        cfg_type=preset.cfg_type,
        guidance_scale=preset.guidance_scale,
        delta=preset.delta,
        seed=preset.seed,
        temporal=preset.temporal,
    )


def load_bundle(spec: ModelSpec, *, progress: bool = True) -> ModelBundle:
    """Load the model (downloading with the hub's progress bars) and apply its acceleration."""
    return accelerate(load_models(spec, progress=progress), spec.accel)


def load_engine(
    spec: ModelSpec,
    width: int,
    height: int,
    preset: Preset,
    *,
    progress: bool = True,
    models: ModelBundle | None = None,
    runner: Callable[[Step], torch.Tensor] = drive,
) -> Engine:
    """An engine on ``models`` (else the model ``spec`` names, loaded now), warmed up and
    conditioned on ``preset``; ``runner`` runs its pipeline steps."""
    bundle = models if models is not None else load_bundle(spec, progress=progress)
    pipe = StreamPipeline(bundle, stream_config(preset, width, height))
    engine = Engine(pipe, preset, spec, runner)
    warm_up(pipe, progress=progress)
    return engine


class SharedModels:
    """The models of several streams in one process: each spec is loaded once; every stream
    gets its own pipeline (its own noise, buffers, prompt and SSF state) on them.

    After a model fault every stream restarts its engine; :meth:`drop` forgets the models
    only for the first of them (the engine was on the models loaded last), so the model is
    reloaded once and the other streams take the fresh copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the dicts; never held while loading
        self._loading: dict[ModelSpec, threading.Lock] = {}
        self._bundles: dict[ModelSpec, ModelBundle] = {}
        self._generation: dict[ModelSpec, int] = {}

    def get(self, spec: ModelSpec, *, progress: bool = False) -> tuple[ModelBundle, int]:
        """The models of ``spec`` (loaded now if needed; one load per spec at a time) and
        which load of them this is."""
        with self._lock:
            loading = self._loading.setdefault(spec, threading.Lock())
        with loading:
            with self._lock:
                if spec in self._bundles:
                    return self._bundles[spec], self._generation[spec]
            bundle = load_bundle(spec, progress=progress)
            with self._lock:
                self._bundles[spec] = bundle
                self._generation[spec] = generation = self._generation.get(spec, 0) + 1
                return bundle, generation

    def drop(self, engine: Engine) -> bool:
        """Forget ``engine``'s models if they are still the current load; True if dropped."""
        with self._lock:
            spec = engine.spec
            if self._generation.get(spec) != engine.generation or spec not in self._bundles:
                return False
            del self._bundles[spec]
            return True


class Engine:
    """One model, one frame size. :meth:`switch` starts a transition; :meth:`process` runs a
    frame; both are called from the same thread."""

    def __init__(
        self,
        pipe: StreamPipeline,
        preset: Preset,
        spec: ModelSpec | None = None,
        runner: Callable[[Step], torch.Tensor] = drive,
    ):
        self.pipe = pipe
        self.spec = spec
        self.preset = preset
        self.runner = runner
        self.generation = 0  # which load of shared models it runs on (SharedModels)
        cfg = pipe.config
        self._transfer = FrameTransfer(cfg.width, cfg.height, pipe.device, pipe.dtype)
        self._fade: Crossfade | None = None
        self._from: PromptEmbeds | None = None
        self._to = pipe.encode_prompt(preset.prompt, preset.negative_prompt)
        self._ssf_settings: SsfSettings | None = None
        self._ssf: SimilarityFilter | None = None
        self._last: np.ndarray | None = None
        #: model calls the last output is behind the frame that entered with it: Stream
        #: Batch finishes a frame ``levels - 1`` calls after it entered (0 just after priming)
        self.lag = 0
        self.embeds = self._to
        self.guidance_scale, self.delta = preset.guidance_scale, preset.delta
        pipe.set_prompt_embeds(self._to)
        self._set_ssf(preset.ssf)

    @property
    def fading(self) -> bool:
        return self._fade is not None

    def switch(self, preset: Preset, now: float) -> None:
        """Start moving to ``preset``: discrete fields now, the rest over its ``transition``."""
        target = self.pipe.encode_prompt(preset.prompt, preset.negative_prompt)
        look = (preset.name, preset.prompt, preset.negative_prompt)
        if look != (self.preset.name, self.preset.prompt, self.preset.negative_prompt):
            self.pipe.reset()  # another look: no feedback or cached frames of the old one
        self.pipe.update(
            seed=preset.seed,
            t_index_list=preset.t_index_list,
            cfg_type=preset.cfg_type,
            temporal=preset.temporal,
        )
        self._set_ssf(preset.ssf)
        self._from, self._to = self.embeds, target
        self._fade = Crossfade(
            start=now,
            duration=preset.transition,
            guidance=(self.guidance_scale, preset.guidance_scale),
            delta=(self.delta, preset.delta),
        )
        self.preset = preset
        self._condition(now)

    def reset(self) -> None:
        """Forget the temporal state (source lost or back): the next frame starts afresh."""
        self.pipe.reset()
        if self._ssf is not None:
            self._ssf.reset()

    def _set_ssf(self, settings: SsfSettings) -> None:
        if settings != self._ssf_settings:
            self._ssf_settings = settings
            self._ssf = (
                SimilarityFilter(settings.threshold, settings.max_skip)
                if settings.enabled
                else None
            )
        elif self._ssf is not None:
            self._ssf.reset()

    def _condition(self, now: float) -> None:
        """Hand the pipeline this instant's blend of the crossfade (if one is running)."""
        if self._fade is None:
            return
        weight = self._fade.weight(now)
        self.embeds = self._to if weight >= 1.0 else self._from.lerp(self._to, weight)
        self.guidance_scale, self.delta = self._fade.scalars(weight)
        self.pipe.set_prompt_embeds(self.embeds)
        self.pipe.update(guidance_scale=self.guidance_scale, delta=self.delta)
        if weight >= 1.0:
            self._fade = self._from = None

    def process(self, image: np.ndarray, now: float) -> tuple[np.ndarray, bool]:
        """Style one frame. Returns ``(output, skipped)``: a skipped frame (SSF; never during
        a crossfade) re-emits the previous output; the output shows the frame that entered
        :attr:`lag` calls ago. Raises :class:`EngineError`."""
        self._condition(now)
        image_in = self._transfer.upload(image)
        skip = self._ssf is not None and not self.fading and self._ssf(image_in)
        if skip and self._last is not None:
            return self._last, True
        primed = self.pipe.primed or not self.pipe.latency_frames
        try:
            out = self.runner(self.pipe.step(image_in))
        except Exception as exc:  # the stream must outlive any model failure
            raise EngineError(f"model step failed: {exc!r}") from exc
        self.lag = min(self.lag + 1, self.pipe.latency_frames) if primed else 0
        if not bool(torch.isfinite(out).all()):
            raise EngineError("model produced non-finite values (NaN/inf)")
        self._last = self._transfer.download(out)
        return self._last, False
