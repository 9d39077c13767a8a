"""StreamDiffusion on diffusers components: Stream Batch, Residual CFG, fixed per-level noise.

One call of :class:`StreamPipeline` takes one input frame (or ``frame_buffer_size`` frames)
and returns one output frame. With Stream Batch on, the UNet sees one batch per call that
holds the new frame at the first denoising level and the ``n - 1`` older frames at the later
levels; the output is the frame that entered ``n - 1`` calls ago, fully denoised. A call is a
:meth:`~StreamPipeline.step` (a generator of model requests, :mod:`.batch`) run alone; the
steps of several pipelines on one model can run together and share each call
(:func:`~broadcast_filter.diffusion.batch.drive_together`).

Images in and out: ``torch.Tensor`` of shape ``(F, 3, H, W)``, RGB, values in ``[0, 1]``, on
the pipeline's device (``F = frame_buffer_size``). Nothing in a step leaves the device.

Notation (DESIGN.md §2): per level ``i`` with timestep ``t_i``, ``a_i = sqrt(abar_t)``,
``b_i = sqrt(1 - abar_t)``, and the LCM boundary scalings ``c_skip_i``, ``c_out_i``;
one denoise is ``x0 = c_out * (x_t - b * eps) / a + c_skip * x_t``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

from broadcast_filter.diffusion.batch import Decode, Encode, Request, Step, UNetCall, drive
from broadcast_filter.diffusion.schedule import (
    CFG_TYPES,
    DEFAULT_T_INDEX,
    MAX_LEVELS,
    NUM_INFERENCE_STEPS,
    CfgType,
    check_t_index_list,
)
from broadcast_filter.diffusion.temporal import (
    FeatureBank,
    TemporalState,
    install_bank_processors,
)
from broadcast_filter.diffusion.temporal_settings import TemporalSettings

if TYPE_CHECKING:
    from broadcast_filter.diffusion.models import ModelBundle

_EMBED_CACHE_SIZE = 32


@dataclass
class StreamConfig:
    """Load-time shape of the stream (``width``, ``height``, ``frame_buffer_size``,
    ``use_stream_batch``, ``mode``) and the live parameters' starting values."""

    width: int = 512
    height: int = 512
    t_index_list: tuple[int, ...] = DEFAULT_T_INDEX
    num_inference_steps: int = NUM_INFERENCE_STEPS
    cfg_type: CfgType = "self"
    guidance_scale: float = 1.2
    delta: float = 1.0
    seed: int = 2
    use_stream_batch: bool = True
    frame_buffer_size: int = 1
    mode: Literal["img2img", "txt2img"] = "img2img"
    temporal: TemporalSettings = field(default_factory=TemporalSettings)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for any value the pipeline cannot run."""
        if self.width % 8 or self.height % 8 or self.width <= 0 or self.height <= 0:
            raise ValueError(
                f"width/height must be positive multiples of 8, got {self.width}x{self.height}"
            )
        try:
            check_t_index_list(self.t_index_list, self.num_inference_steps)
        except ValueError as exc:
            raise ValueError(f"t_index_list: {exc}, got {tuple(self.t_index_list)}") from None
        if self.cfg_type not in CFG_TYPES:
            raise ValueError(f"cfg_type must be one of {CFG_TYPES}, got {self.cfg_type!r}")
        if self.frame_buffer_size < 1:
            raise ValueError(f"frame_buffer_size must be >= 1, got {self.frame_buffer_size}")
        if self.mode not in ("img2img", "txt2img"):
            raise ValueError(f"mode must be 'img2img' or 'txt2img', got {self.mode!r}")


@dataclass(frozen=True)
class PromptEmbeds:
    """Text conditioning: positive and negative CLIP hidden states, each ``(1, 77, D)``."""

    cond: torch.Tensor
    uncond: torch.Tensor

    def lerp(self, other: PromptEmbeds, weight: float) -> PromptEmbeds:
        """``(1 - weight) * self + weight * other``, for crossfades between presets."""
        return PromptEmbeds(
            torch.lerp(self.cond, other.cond, weight), torch.lerp(self.uncond, other.uncond, weight)
        )


@dataclass
class _Schedule:
    """Per-batch-element coefficients ``(levels*F, 1, 1, 1)`` and timesteps ``(levels*F,)``."""

    timesteps: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor


class StreamPipeline:
    """Real-time img2img/txt2img over a :class:`ModelBundle` (UNet, VAE, CLIP, LCM scheduler)."""

    def __init__(self, models: ModelBundle, config: StreamConfig | None = None) -> None:
        self.config = replace(config or StreamConfig())
        self.config.validate()
        if models.scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                "only epsilon-prediction models are supported, "
                f"got prediction_type={models.scheduler.config.prediction_type!r}"
            )
        self.models = models
        self.device, self.dtype = models.device, models.dtype
        self._vae_scale = float(models.vae.config.scaling_factor)
        blocks = models.vae.config[
            "encoder_block_out_channels"  # AutoencoderTiny
            if "encoder_block_out_channels" in models.vae.config
            else "block_out_channels"
        ]
        scale = 2 ** (len(blocks) - 1)  # the VAE's downsampling (diffusers' vae_scale_factor)
        self._latent_shape = (4, self.config.height // scale, self.config.width // scale)
        self._embeds_cache: OrderedDict[tuple[str, str], PromptEmbeds] = OrderedDict()
        self._embeds: PromptEmbeds | None = None
        self._hidden: dict[tuple[int, int], torch.Tensor] = {}  # by (batch, negatives)
        self._buffer: torch.Tensor | None = None  # latents of frames in flight, levels 1..n-1
        self._stock: torch.Tensor | None = None  # residual noise carried with those frames
        self._schedule = self._make_schedule(self.config.t_index_list)
        self._noise = self._make_noise(self.config.seed)
        self._generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self._temporal = TemporalState(self.config.temporal)
        self._bank: FeatureBank | None = None  # the feature bank of the call being run
        if self.config.temporal.cache_frames:
            install_bank_processors(models.unet)

    # ------------------------------------------------------------------ preparation

    @property
    def levels(self) -> int:
        return len(self.config.t_index_list)

    @property
    def primed(self) -> bool:
        """Whether frames are in flight (the next call does not prime the stream)."""
        return self._buffer is not None

    @property
    def latency_frames(self) -> int:
        """How many calls an input takes to reach the output (0 without Stream Batch)."""
        return self.levels - 1 if self.config.use_stream_batch else 0

    def _make_schedule(self, t_index_list: Sequence[int]) -> _Schedule:
        scheduler = self.models.scheduler
        scheduler.set_timesteps(self.config.num_inference_steps)
        timesteps = [int(scheduler.timesteps[i]) for i in t_index_list]
        abar = scheduler.alphas_cumprod.to(torch.float64)
        scalings = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in timesteps]
        per_level = {
            "a": [abar[t].sqrt() for t in timesteps],
            "b": [(1 - abar[t]).sqrt() for t in timesteps],
            "c_skip": [torch.as_tensor(s[0], dtype=torch.float64) for s in scalings],
            "c_out": [torch.as_tensor(s[1], dtype=torch.float64) for s in scalings],
        }
        f = self.config.frame_buffer_size

        def per_element(values: list[torch.Tensor]) -> torch.Tensor:
            col = torch.stack(values).repeat_interleave(f).view(-1, 1, 1, 1)
            return col.to(device=self.device, dtype=self.dtype)

        return _Schedule(
            timesteps=torch.tensor(timesteps, device=self.device).repeat_interleave(f),
            **{k: per_element(v) for k, v in per_level.items()},
        )

    def _make_noise(self, seed: int) -> torch.Tensor:
        """Fixed noise, drawn once from ``seed`` on the CPU (the same on every device):
        level ``i`` uses rows ``i*F:(i+1)*F``, drawn ``i``-th, so level 0's noise is exactly
        what diffusers' img2img draws for one image from a generator with that seed."""
        generator = torch.Generator().manual_seed(seed)
        shape = (self.config.frame_buffer_size, *self._latent_shape)
        draws = [torch.randn(shape, generator=generator) for _ in range(MAX_LEVELS)]
        return torch.cat(draws).to(self.device, self.dtype)

    @torch.inference_mode()
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        """CLIP-encode a prompt pair once; later calls with the same pair hit a small cache."""
        key = (prompt, negative_prompt)
        if key in self._embeds_cache:
            self._embeds_cache.move_to_end(key)
            return self._embeds_cache[key]
        tokenizer, encoder = self.models.tokenizer, self.models.text_encoder
        tokens = tokenizer(
            [prompt, negative_prompt],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        hidden = encoder(tokens)[0].to(self.dtype)
        embeds = PromptEmbeds(cond=hidden[:1], uncond=hidden[1:])
        self._embeds_cache[key] = embeds
        if len(self._embeds_cache) > _EMBED_CACHE_SIZE:
            self._embeds_cache.popitem(last=False)
        return embeds

    def set_prompt(self, prompt: str, negative_prompt: str = "") -> None:
        self.set_prompt_embeds(self.encode_prompt(prompt, negative_prompt))

    def set_prompt_embeds(self, embeds: PromptEmbeds) -> None:
        """Condition the next calls on ``embeds``; frames in flight keep their latents."""
        self._embeds = embeds
        self._hidden.clear()

    def update(
        self,
        *,
        guidance_scale: float | None = None,
        delta: float | None = None,
        seed: int | None = None,
        t_index_list: Sequence[int] | None = None,
        cfg_type: CfgType | None = None,
        temporal: TemporalSettings | None = None,
    ) -> None:
        """Change live parameters between calls, without rebuilding anything heavy.

        A new ``t_index_list`` of the same length keeps the frames in flight; another length
        restarts the stream (the next call primes the buffer from its own input, so no frame
        comes out grey). A new seed replaces the fixed noise and, like a restart, resets the
        temporal state (:meth:`reset`). New ``temporal`` settings apply from the next call.
        """
        changes = {
            k: v
            for k, v in {
                "guidance_scale": guidance_scale,
                "delta": delta,
                "seed": seed,
                "t_index_list": None if t_index_list is None else tuple(t_index_list),
                "cfg_type": cfg_type,
                "temporal": temporal,
            }.items()
            if v is not None
        }
        new = replace(self.config, **changes)
        new.validate()
        if new.t_index_list != self.config.t_index_list:
            self._schedule = self._make_schedule(new.t_index_list)
            if len(new.t_index_list) != self.levels:
                self._buffer = self._stock = None
                self._temporal.reset()
        if new.seed != self.config.seed:
            self._noise = self._make_noise(new.seed)
            self._generator.manual_seed(new.seed)
            self._temporal.reset()
        if new.temporal != self.config.temporal:
            self._temporal.configure(new.temporal)
            if new.temporal.cache_frames:
                install_bank_processors(self.models.unet)
        self.config = new
        self._hidden.clear()

    def restart(self) -> None:
        """Drop the frames in flight: the next call primes the stream from its own input."""
        self._buffer = self._stock = None
        self._generator.manual_seed(self.config.seed)
        self._temporal.reset()

    def reset(self) -> None:
        """Forget the temporal state (feedback latent, previous output, attention cache):
        the next input starts a new scene, as after a hard cut (e.g. on source loss)."""
        self._temporal.reset()

    @property
    def temporal_state(self) -> TemporalState:
        """This stream's temporal state, for inspection."""
        return self._temporal

    # ------------------------------------------------------------------ one call

    @property
    def _guided(self) -> bool:
        return self.config.guidance_scale > 1.0 and self.config.cfg_type != "none"

    def _encoder_hidden_states(self, batch: int, n_uncond: int) -> torch.Tensor:
        """Conditioning for ``n_uncond`` negative then ``batch`` positive UNet inputs."""
        if self._embeds is None:
            raise RuntimeError("no prompt set: call set_prompt() or set_prompt_embeds() first")
        key = (batch, n_uncond)
        if key not in self._hidden:
            cond = self._embeds.cond.expand(batch, -1, -1)
            uncond = self._embeds.uncond.expand(n_uncond, -1, -1)
            self._hidden[key] = torch.cat([uncond, cond]) if n_uncond else cond
        return self._hidden[key]

    def _denoise(
        self, x_t: torch.Tensor, stock: torch.Tensor, sl: slice
    ) -> Generator[Request, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One UNet call on ``x_t`` (schedule elements ``sl``): returns ``(x0, eps, stock)``.

        ``stock`` is the residual noise of each element, the negative prediction of the
        ``self`` and ``initialize`` modes. ``full`` predicts a real negative for every element;
        ``initialize`` only for the frame(s) at the first level, whose stock it replaces.
        """
        s, cfg, f = self._schedule, self.config.cfg_type, self.config.frame_buffer_size
        n = x_t.shape[0]
        n_uncond = 0
        if self._guided and cfg == "full":
            n_uncond = n
        elif self._guided and cfg == "initialize" and sl.start == 0:
            n_uncond = f
        t = s.timesteps[sl]
        hidden = self._encoder_hidden_states(n, n_uncond)
        x_in = torch.cat([x_t[:n_uncond], x_t]) if n_uncond else x_t
        t_in = torch.cat([t[:n_uncond], t]) if n_uncond else t
        kwargs = None
        if self._bank is not None:
            self._bank.site = (sl.start, sl.stop, n_uncond)
            kwargs = {"feature_bank": self._bank}
        pred = yield UNetCall(self.models.unet, x_in, t_in, hidden, kwargs)
        eps_c = pred[n_uncond:]
        if cfg == "full":
            eps_u = pred[:n_uncond]
        else:
            if n_uncond:
                stock = torch.cat([pred[:n_uncond], stock[n_uncond:]])
            eps_u = self.config.delta * stock
        eps = eps_u + self.config.guidance_scale * (eps_c - eps_u) if self._guided else eps_c
        x0 = s.c_out[sl] * (x_t - s.b[sl] * eps) / s.a[sl] + s.c_skip[sl] * x_t
        return x0, eps, stock

    def _next_stock(
        self, x0: torch.Tensor, eps: torch.Tensor, stock: torch.Tensor, sl: slice, nxt: slice
    ) -> torch.Tensor:
        """Residual noise for the next level: the level's fixed noise plus the part of the
        carried noise that the guided step left in ``x0`` (StreamDiffusion's RCFG update)."""
        s = self._schedule
        carried = s.b[sl] * stock
        left = s.c_out[sl] * (carried - s.b[sl] * eps) / s.a[sl] + s.c_skip[sl] * carried
        return self._noise[nxt] + s.a[nxt] * left / s.b[nxt]

    def _encode(self, image: torch.Tensor) -> Generator[Request, torch.Tensor, torch.Tensor]:
        latents = yield Encode(self.models.vae, image.to(self.device, self.dtype) * 2 - 1)
        return latents * self._vae_scale

    def _decode(self, latents: torch.Tensor) -> Generator[Request, torch.Tensor, torch.Tensor]:
        image = yield Decode(self.models.vae, latents / self._vae_scale)
        return (image / 2 + 0.5).clamp(0, 1)

    def _first_latents(
        self, image: torch.Tensor | None, feedback: tuple[torch.Tensor, float] | None = None
    ) -> Generator[Request, torch.Tensor, torch.Tensor]:
        f = self.config.frame_buffer_size
        if self.config.mode == "txt2img":
            shape = (f, *self._latent_shape)
            return torch.randn(
                shape, generator=self._generator, device=self.device, dtype=self.dtype
            )
        expected = (f, 3, self.config.height, self.config.width)
        if image is None or tuple(image.shape) != expected:
            got = None if image is None else tuple(image.shape)
            raise ValueError(f"img2img expects an image tensor of shape {expected}, got {got}")
        s, z = self._schedule, (yield from self._encode(image))
        if feedback is not None:  # latent feedback: z = (1 - s) * E(image) + s * z_prev
            z_prev, strength = feedback
            z = (1 - strength) * z + strength * z_prev
        return s.a[:f] * z + s.b[:f] * self._noise[:f]

    def _sequential(
        self, x_t: torch.Tensor, levels: int
    ) -> Generator[Request, torch.Tensor, tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]]:
        """Denoise the newest frame(s) level by level; also return each later level's
        ``(latent, stock)`` so a Stream Batch buffer can be primed from them."""
        f = self.config.frame_buffer_size
        stock = self._noise[:f]
        states: list[tuple[torch.Tensor, ...]] = []
        for i in range(levels):
            sl = slice(i * f, (i + 1) * f)
            x0, eps, stock = yield from self._denoise(x_t, stock, sl)
            if i + 1 < self.levels:
                nxt = slice((i + 1) * f, (i + 2) * f)
                stock = self._next_stock(x0, eps, stock, sl, nxt)
                x_t = self._schedule.a[nxt] * x0 + self._schedule.b[nxt] * self._noise[nxt]
                states.append((x_t, stock))
        return x0, states

    def __call__(self, image: torch.Tensor | None = None) -> torch.Tensor:
        """Process one input (``(F, 3, H, W)`` in ``[0, 1]``; ``None`` for txt2img)."""
        return drive(self.step(image))

    def step(self, image: torch.Tensor | None = None) -> Step:
        """One call as a generator of model requests (see :mod:`.batch`), returning the
        output. With a temporal technique on, the input is first compared with the previous
        one (one small device-to-host read, for the hard-cut rule)."""
        if not self.config.temporal.active:
            self._bank = None
            latent, _ = yield from self._run(image, None)
            return (yield from self._decode(latent))
        tm, lag = self._temporal, self.latency_frames
        if image is not None and self.config.mode == "img2img":
            tm.observe(image.to(self.device), lag)
        else:
            tm.observe(None, lag)
        self._bank = tm.bank_for_call(lag)
        try:
            latent, newest = yield from self._run(image, tm.feedback_latent())
        finally:
            self._bank = None
        return tm.finish(newest, (yield from self._decode(latent)), lag)

    def _run(
        self, image: torch.Tensor | None, feedback: tuple[torch.Tensor, float] | None
    ) -> Generator[Request, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One call's UNet work: the output's latent and the newest frame's clean-latent
        estimate (with Stream Batch its first-level prediction: the output latent is of a
        frame ``lag`` calls older)."""
        x_t = yield from self._first_latents(image, feedback)
        n, f = self.levels, self.config.frame_buffer_size
        if not self.config.use_stream_batch or n == 1:
            x0, _ = yield from self._sequential(x_t, n)
            return x0, x0
        if self._buffer is None:
            # Prime: fill the frames in flight with this input's own partial denoising.
            _, states = yield from self._sequential(x_t, n - 1)
            self._buffer = torch.cat([x for x, _ in states])
            self._stock = torch.cat([s for _, s in states])
        x_batch = torch.cat([x_t, self._buffer])
        stock = torch.cat([self._noise[:f], self._stock])
        x0, eps, stock = yield from self._denoise(x_batch, stock, slice(0, n * f))
        head, nxt = slice(0, (n - 1) * f), slice(f, n * f)
        s = self._schedule
        self._buffer = s.a[nxt] * x0[head] + s.b[nxt] * self._noise[nxt]
        self._stock = self._next_stock(x0[head], eps[head], stock[head], head, nxt)
        return x0[-f:], x0[:f]
