"""Temporal consistency for one stream: latent feedback, flow-guided output blend, the
extended self-attention cache (feature bank), and the reset rules that keep them honest.

All state of one stream lives in a :class:`TemporalState` (no globals): several streams can
share one UNet, each handing its own :class:`FeatureBank` to the attention processors
through ``cross_attention_kwargs``.

Frame bookkeeping. Call ``k`` takes input frame ``k``; with Stream Batch its output is frame
``k - lag``. A *cut* (input correlation with the previous input below ``cut_threshold``, an
explicit :meth:`TemporalState.reset`, the first frame) at frame ``c`` means nothing from
before ``c`` may reach an output of frame ``c`` or later:

- feedback at call ``k`` blends in the previous call's clean-latent estimate of frame
  ``k - 1`` (without Stream Batch its output latent, with it the first level's prediction,
  so that the frames form one chain rather than ``lag + 1`` interleaved ones): allowed when
  ``c <= k - 1``, at a strength that ramps up over :data:`FEEDBACK_RAMP` frames after a cut
  (the first frames of a scene have nothing to feed back; a full-strength start would jump);
- the output blend at call ``k`` mixes frame ``k - lag`` with frame ``k - 1 - lag``: the
  same rule;
- the feature bank is emptied at a cut and records again only once every frame of the
  batch (``k - lag .. k``) is from after the cut (``c <= k - lag``), so no batch row ever
  attends to features of a frame from before its own cut.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from broadcast_filter.diffusion.temporal_settings import TemporalSettings

_THUMB = 32  # cut detection works on 32x32 luma copies
_RADIUS = 4  # block-matching search radius at the flow's resolution
_WINDOW = 7  # block size of the matching cost
_CONTEXT = 31  # a wider block that decides where the small one is ambiguous (flat regions)
_ZERO_BIAS = 0.002  # cost per pixel of motion: flat regions prefer no motion
_OCCLUDED = 0.06  # matching cost (mean |difference|, 0..1) above which a pixel is not blended

_LUMA = (0.299, 0.587, 0.114)
#: Frames over which latent feedback ramps up to its strength after a cut.
FEEDBACK_RAMP = 4


def luma(image: torch.Tensor) -> torch.Tensor:
    """``(F, 3, H, W)`` RGB in [0, 1] -> ``(F, 1, H, W)`` luma."""
    w = torch.tensor(_LUMA, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    return (image * w).sum(dim=1, keepdim=True)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two luma images on small copies, per frame ``(F,)``; two flat
    images count as correlated (1) unless their brightness differs by more than 0.25."""
    ta = F.interpolate(a.float(), size=(_THUMB, _THUMB), mode="area").flatten(1)
    tb = F.interpolate(b.float(), size=(_THUMB, _THUMB), mode="area").flatten(1)
    da, db = ta - ta.mean(1, keepdim=True), tb - tb.mean(1, keepdim=True)
    va, vb = (da * da).mean(1), (db * db).mean(1)
    corr = (da * db).mean(1) / (va * vb).sqrt().clamp_min(1e-12)
    flat = (va < 1e-6) & (vb < 1e-6)
    same_level = (ta.mean(1) - tb.mean(1)).abs() <= 0.25
    corr = torch.where(flat, same_level.to(corr.dtype), corr)
    return torch.where(same_level, corr, torch.zeros_like(corr))


def flow_scale(height: int, width: int, size: int) -> int:
    """Downscaling factor of the flow estimate for a frame size, so that the estimate is at
    most ``size`` wide and high (``TemporalSettings.flow_size``)."""
    return max(1, -(-max(height, width) // size))


def _box_sum(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Sum over a ``size`` window around each position along ``dim``, the window cut at the
    ends (a running sum: the cost does not grow with ``size``)."""
    n, half = x.shape[dim], size // 2
    # zeros before and after: table[j] sums x[: j - half], so window i is table[i + size] - table[i]
    table = F.pad(x, [0, 0] * (x.ndim - 1 - dim % x.ndim) + [half + 1, half]).cumsum(dim)
    return table.narrow(dim, size, n) - table.narrow(dim, 0, n)


def box_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over a ``size`` x ``size`` window around each pixel of ``(N, C, H, W)``, the
    window cut at the borders (separable running sums: the cost does not grow with ``size``)."""
    half = size // 2
    h, w = x.shape[-2:]
    total = _box_sum(_box_sum(x.float(), size, -1), size, -2)
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = (ys + half + 1).clamp(max=h) - (ys - half).clamp(min=0)
    cols = (xs + half + 1).clamp(max=w) - (xs - half).clamp(min=0)
    return (total / (rows.view(-1, 1) * cols.view(1, -1))).to(x.dtype)


def estimate_flow(prev: torch.Tensor, cur: torch.Tensor, scale: int) -> torch.Tensor:
    """Dense integer motion from ``prev`` to ``cur`` (luma ``(F, 1, H, W)``) by block
    matching at ``1/scale`` resolution: returns ``(F, 3, h, w)`` holding per pixel
    ``(dx, dy)`` in full-resolution pixels (``cur(p) ~ prev(p - d)``) and the matching cost
    (mean absolute difference over the small block). The cost that picks the motion adds a
    wider block's and the whole frame's, so flat regions take their neighbours' or the
    dominant motion, and a small bias toward no motion."""
    if scale > 1:
        prev, cur = F.avg_pool2d(prev, scale), F.avg_pool2d(cur, scale)
    r, (h, w) = _RADIUS, cur.shape[-2:]
    padded = F.pad(prev, (r, r, r, r), mode="replicate")
    shifts = [(dx, dy) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    diff = torch.cat(
        [(cur - padded[..., r - dy : r - dy + h, r - dx : r - dx + w]).abs() for dx, dy in shifts],
        dim=1,
    )  # (F, S, h, w)
    near = box_mean(diff, _WINDOW)
    bias = torch.tensor([abs(dx) + abs(dy) for dx, dy in shifts], device=cur.device)
    choice = (
        near
        + 0.5 * box_mean(diff, _CONTEXT)
        + 0.25 * diff.mean(dim=(2, 3), keepdim=True)
        + _ZERO_BIAS * bias.to(diff.dtype).view(1, -1, 1, 1)
    )
    best = choice.argmin(dim=1, keepdim=True)
    cost = torch.gather(near, 1, best)
    table = torch.tensor(shifts, device=cur.device, dtype=cur.dtype) * scale  # (S, 2)
    d = table[best.squeeze(1)].permute(0, 3, 1, 2)  # (F, 2, h, w)
    return torch.cat([d, cost], dim=1)


def warp(image: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` (``(F, C, H, W)``) moved by ``flow`` (from :func:`estimate_flow`, at any
    resolution): returns the moved image and a ``(F, 1, H, W)`` mask of pixels that were
    matched (cost below the occlusion bound) and come from inside the frame."""
    height, width = image.shape[-2:]
    if flow.shape[-2:] != (height, width):
        flow = F.interpolate(flow, size=(height, width), mode="nearest")
    ys, xs = torch.meshgrid(
        torch.arange(height, device=image.device, dtype=image.dtype),
        torch.arange(width, device=image.device, dtype=image.dtype),
        indexing="ij",
    )
    sx, sy = xs - flow[:, 0], ys - flow[:, 1]
    inside = (sx >= 0) & (sx <= width - 1) & (sy >= 0) & (sy <= height - 1)
    grid = torch.stack([2 * sx / max(width - 1, 1) - 1, 2 * sy / max(height - 1, 1) - 1], dim=-1)
    moved = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    valid = inside & (flow[:, 2] <= _OCCLUDED)
    return moved, valid.unsqueeze(1).to(image.dtype)


# ----------------------------------------------------------------------------- feature bank


@dataclass
class FeatureBank:
    """Self-attention input tokens of earlier frames, per layer and UNet call site.

    The pipeline sets :attr:`site` before each UNet call (which batch layout it is);
    the attention processors read the cached tokens of that site (:meth:`cached`) and, when
    :attr:`recording`, hand in this frame's (:meth:`record`). :meth:`commit` files the
    recorded frame as the newest, keeping at most ``frames``. Keys and values are linear
    projections of these tokens, so caching the tokens caches both at half the memory.
    """

    frames: int
    site: tuple = ()
    recording: bool = False
    _store: deque = field(default_factory=deque)
    _pending: dict = field(default_factory=dict)

    def cached(self, layer: str) -> list[torch.Tensor]:
        key = (layer, self.site)
        return [entry[key] for entry in self._store if key in entry]

    def record(self, layer: str, tokens: torch.Tensor) -> None:
        if self.recording:
            self._pending[(layer, self.site)] = tokens

    def commit(self) -> None:
        if self._pending:
            self._store.append(self._pending)
            while len(self._store) > self.frames:
                self._store.popleft()
        self._pending = {}

    def clear(self) -> None:
        self._store.clear()
        self._pending = {}

    def __len__(self) -> int:
        """How many earlier frames are cached."""
        return len(self._store)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self._store for t in e.values())


class BankAttnProcessor:
    """Wraps an attention processor: a self-attention layer handed a ``feature_bank``
    attends to its own tokens and the bank's cached tokens of earlier frames (keys and
    values of ``[x; cached...]``); without a bank, or in cross-attention, it is the wrapped
    processor unchanged."""

    def __init__(self, inner, layer: str) -> None:
        self.inner, self.layer = inner, layer

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        feature_bank: FeatureBank | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if feature_bank is not None and encoder_hidden_states is None and hidden_states.ndim == 3:
            feature_bank.record(self.layer, hidden_states)
            cached = feature_bank.cached(self.layer)
            if cached:
                encoder_hidden_states = torch.cat([hidden_states, *cached], dim=1)
        if temb is not None:
            kwargs["temb"] = temb
        return self.inner(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **kwargs,
        )


def install_bank_processors(unet) -> None:
    """Wrap every attention processor of ``unet`` once (cross-attention too, so diffusers
    never warns about the unexpected ``feature_bank`` keyword). Without a bank in
    ``cross_attention_kwargs`` the wrapped processors compute exactly what they did."""
    processors = unet.attn_processors
    if all(isinstance(p, BankAttnProcessor) for p in processors.values()):
        return
    unet.set_attn_processor(
        {
            name: p if isinstance(p, BankAttnProcessor) else BankAttnProcessor(p, name)
            for name, p in processors.items()
        }
    )


# ----------------------------------------------------------------------------- stream state


class TemporalState:
    """The temporal state of one stream (see the module notes for the frame rules)."""

    def __init__(self, settings: TemporalSettings) -> None:
        self.settings = settings
        self.bank = FeatureBank(max(1, settings.cache_frames))
        self.frame = 0  # index of the next input
        self.last_cut = 0
        self.cuts = 0  # how many resets so far (cuts, explicit resets, the first frame)
        self.last_similarity: float | None = None
        self.prev_latent: torch.Tensor | None = None  # previous frame's clean-latent estimate
        self.prev_output: torch.Tensor | None = None  # the previous output as shown
        self._inputs: deque[torch.Tensor] = deque()  # luma of the latest inputs
        self._reset_pending = True

    def configure(self, settings: TemporalSettings) -> None:
        """Take new settings live; what a technique that was turned off kept is dropped, and
        a stream that had every technique off starts afresh."""
        if settings.active and not self.settings.active:
            self.reset()
        if settings.feedback == 0:
            self.prev_latent = None
        if settings.cache_frames != self.settings.cache_frames:
            self.bank.frames = max(1, settings.cache_frames)
            if settings.cache_frames == 0:
                self.bank.clear()
            while len(self.bank) > self.bank.frames:
                self.bank._store.popleft()
        self.settings = settings

    def reset(self) -> None:
        """Forget everything: the next input starts a new scene (a cut)."""
        self._reset_pending = True

    def _cut(self, k: int) -> None:
        self.last_cut = k
        self.cuts += 1
        self.prev_latent = self.prev_output = None
        self.bank.clear()

    def observe(self, image: torch.Tensor | None, lag: int) -> None:
        """Take call ``k``'s input: detect a cut (one small device-to-host read) and keep
        its luma for the motion estimate."""
        k = self.frame
        if image is None:  # txt2img: no input, no cuts but explicit ones
            if self._reset_pending:
                self._reset_pending = False
                self._cut(k)
            self.frame += 1
            return
        y = luma(image.float())
        if self._reset_pending or not self._inputs:
            self._reset_pending = False
            self._inputs.clear()
            self._cut(k)
        else:
            similarity = correlation(self._inputs[-1], y).min().item()
            self.last_similarity = similarity
            if similarity < self.settings.cut_threshold:
                self._cut(k)
        self._inputs.append(y)
        while len(self._inputs) > lag + 2:
            self._inputs.popleft()
        self.frame += 1

    def _call(self) -> int:
        return self.frame - 1  # the call being run (observe() has counted it)

    def continues(self, lag: int) -> bool:
        """Whether the previous output and this call's output are of the same scene."""
        return self.last_cut <= self._call() - 1 - lag

    def feedback_latent(self) -> tuple[torch.Tensor, float] | None:
        """``(z_prev, s)`` for this call's latent feedback, or ``None``."""
        since = self._call() - self.last_cut  # >= 1: the previous frame is of this scene
        if self.settings.feedback > 0 and self.prev_latent is not None and since >= 1:
            return self.prev_latent, self.settings.feedback * min(1.0, since / FEEDBACK_RAMP)
        return None

    def bank_for_call(self, lag: int) -> FeatureBank | None:
        """The bank for this call's UNet calls (``None``: cache off); records this frame
        only every ``cache_interval`` calls and once the whole batch is past the last cut."""
        if self.settings.cache_frames == 0:
            return None
        k = self._call()
        since = k - (self.last_cut + lag)
        self.bank.recording = since >= 0 and since % self.settings.cache_interval == 0
        return self.bank

    def finish(self, newest: torch.Tensor, output: torch.Tensor, lag: int) -> torch.Tensor:
        """Keep this call's clean-latent estimate of its newest frame (for feedback) and
        return the output, blended with the previous output moved by the input's motion
        when ``flow_blend`` is on and allowed."""
        self.bank.commit()
        if self.settings.feedback > 0:
            self.prev_latent = newest
        alpha = self.settings.flow_blend
        ready = self.prev_output is not None and len(self._inputs) >= lag + 2
        if alpha > 0 and ready and self.continues(lag):
            before, after = self._inputs[-(lag + 2)], self._inputs[-(lag + 1)]
            height, width = output.shape[-2:]
            scale = flow_scale(height, width, self.settings.flow_size)
            flow = estimate_flow(before, after, scale)
            moved, valid = warp(self.prev_output.to(output.dtype), flow.to(output.dtype))
            output = torch.lerp(output, moved, alpha * valid)
        self.prev_output = output if alpha > 0 else None
        return output
