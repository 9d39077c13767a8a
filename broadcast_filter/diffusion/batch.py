"""Model calls as requests, so that several streams can share one call.

A :class:`~broadcast_filter.diffusion.stream.StreamPipeline` step is a generator
(:data:`Step`): it yields each model call it needs (:class:`UNetCall`, :class:`Encode`,
:class:`Decode`), receives the call's output, and returns the step's output image. Run alone
(:func:`drive`) that is the plain sequence of calls. :func:`drive_together` runs the steps of
several streams side by side: in each round it collects every step's next request and makes
one call per group of requests that can share a batch (same module, same latent or image
size, same dtype), concatenated along the batch dimension and split again. Every element of a
UNet batch carries its own timestep and text conditioning, so streams with different prompts,
levels, guidance modes or Stream Batch settings still share a call; only another frame size
or another model keeps them apart. A request with extra attention arguments (the temporal
feature bank) runs alone.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderTiny


@dataclass
class UNetCall:
    """``unet(sample, timestep, hidden, cross_attention_kwargs=kwargs).sample``."""

    unet: Any
    sample: torch.Tensor
    timestep: torch.Tensor
    hidden: torch.Tensor
    kwargs: dict[str, Any] | None = None

    def key(self) -> Hashable | None:
        if self.kwargs is not None:
            return None
        s = self.sample
        return ("unet", id(self.unet), s.shape[1:], self.hidden.shape[1:], s.dtype, s.device)

    @staticmethod
    def run(calls: Sequence[UNetCall]) -> list[torch.Tensor]:
        first = calls[0]
        if len(calls) == 1:
            c = first
            if c.kwargs is None:
                return [c.unet(c.sample, c.timestep, c.hidden).sample]
            return [c.unet(c.sample, c.timestep, c.hidden, cross_attention_kwargs=c.kwargs).sample]
        pred = first.unet(
            torch.cat([c.sample for c in calls]),
            torch.cat([c.timestep for c in calls]),
            torch.cat([c.hidden for c in calls]),
        ).sample
        return list(pred.split([c.sample.shape[0] for c in calls]))


@dataclass
class Encode:
    """The VAE's latent of ``image`` (in ``[-1, 1]``), before the scaling factor."""

    vae: Any
    image: torch.Tensor

    def key(self) -> Hashable:
        return ("encode", id(self.vae), self.image.shape[1:], self.image.dtype)

    @staticmethod
    def run(calls: Sequence[Encode]) -> list[torch.Tensor]:
        vae = calls[0].vae
        out = vae.encode(torch.cat([c.image for c in calls]))
        latents = out.latents if isinstance(vae, AutoencoderTiny) else out.latent_dist.mode()
        return list(latents.split([c.image.shape[0] for c in calls]))


@dataclass
class Decode:
    """The VAE's image (in ``[-1, 1]``) of unscaled ``latents``."""

    vae: Any
    latents: torch.Tensor

    def key(self) -> Hashable:
        return ("decode", id(self.vae), self.latents.shape[1:], self.latents.dtype)

    @staticmethod
    def run(calls: Sequence[Decode]) -> list[torch.Tensor]:
        image = calls[0].vae.decode(torch.cat([c.latents for c in calls])).sample
        return list(image.split([c.latents.shape[0] for c in calls]))


Request = UNetCall | Encode | Decode
Step = Generator[Request, torch.Tensor, torch.Tensor]


def run_requests(requests: Sequence[Request]) -> list[torch.Tensor | BaseException]:
    """Run ``requests``, one call per group that can share a batch; each gets its output, or
    the exception its group's call raised (the other groups are not affected)."""
    groups: dict[Hashable, list[int]] = {}
    for i, request in enumerate(requests):
        key = request.key()
        groups.setdefault(("alone", i) if key is None else key, []).append(i)
    results: list[torch.Tensor | BaseException] = [None] * len(requests)  # type: ignore[list-item]
    with torch.inference_mode():
        for members in groups.values():
            calls = [requests[i] for i in members]
            try:
                outputs: list[torch.Tensor | BaseException] = list(type(calls[0]).run(calls))
            except Exception as exc:  # the model failed for this group: each member is told
                outputs = [exc] * len(calls)
            for i, out in zip(members, outputs, strict=True):
                results[i] = out
    return results


def _alone(request: Request) -> torch.Tensor | BaseException:
    return run_requests([request])[0]


def drive(
    step: Step, call: Callable[[Request], torch.Tensor | BaseException] = _alone
) -> torch.Tensor:
    """Run one step, each request through ``call`` (by default alone, as it comes)."""
    with torch.inference_mode():
        try:
            request = next(step)
            while True:
                out = call(request)
                request = step.throw(out) if isinstance(out, BaseException) else step.send(out)
        except StopIteration as stop:
            return stop.value


def drive_together(steps: Sequence[Step]) -> list[torch.Tensor | BaseException]:
    """Run several streams' steps side by side, sharing calls round by round; each step
    gets its output image, or the exception that ended it (the others go on)."""
    results: list[torch.Tensor | BaseException] = [None] * len(steps)  # type: ignore[list-item]
    pending: dict[int, Request] = {}
    with torch.inference_mode():
        for i, step in enumerate(steps):
            _advance(step, i, lambda s: next(s), pending, results)
        while pending:
            order = list(pending)
            outputs = run_requests([pending.pop(i) for i in order])
            for i, out in zip(order, outputs, strict=True):
                if isinstance(out, BaseException):
                    _advance(steps[i], i, lambda s, e=out: s.throw(e), pending, results)
                else:
                    _advance(steps[i], i, lambda s, o=out: s.send(o), pending, results)
    return results


def _advance(step: Step, i: int, move, pending: dict[int, Request], results: list) -> None:
    try:
        pending[i] = move(step)
    except StopIteration as stop:
        results[i] = stop.value
    except Exception as exc:
        results[i] = exc
