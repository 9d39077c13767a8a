"""``dtype: auto`` on a CPU: bfloat16 where the CPU runs it natively and a one-off check
shows its output close to float32's, float32 otherwise.

The check (:func:`auto_on_cpu`) runs one frame of a small test picture through the stream
pipeline (sequential denoising over the default levels, fixed noise and prompt) in float32,
casts the modules to bfloat16 and runs the same frame again; the figure is the mean absolute
difference of the two decoded pictures, in ``[0, 1]``. bfloat16 is picked when it is at most
:data:`BF16_TOLERANCE`. The decision is cached per model spec for the life of the process.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from broadcast_filter.diffusion.stream import StreamConfig, StreamPipeline

if TYPE_CHECKING:
    from broadcast_filter.diffusion.models import ModelBundle

#: Largest mean absolute difference (pictures in ``[0, 1]``; 0.01 is 2.55 of 255 levels)
#: between the bfloat16 and float32 outputs for which ``dtype: auto`` picks bfloat16.
BF16_TOLERANCE = 0.01
CHECK_SIZE = 64  # the check's picture, in pixels (one UNet call per level at 8x8 latents)
CHECK_PROMPT = "a photo"
#: /proc/cpuinfo flags (x86 ``flags``, Arm ``Features``) for native bfloat16, by name.
LINUX_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "bf16": "Arm BF16"}


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype ``auto`` resolved to and why, e.g. ``bfloat16`` / ``CPU has AVX512-BF16; ...``."""

    dtype: torch.dtype
    reason: str

    def describe(self) -> str:
        return f"dtype auto -> {str(self.dtype).removeprefix('torch.')} ({self.reason})"


_CHOICES: dict[Hashable, DtypeChoice] = {}  # by model spec, for the life of the process


def native_bf16() -> str | None:
    """The CPU feature that runs bfloat16 natively (``AMX-BF16``, ``AVX512-BF16``,
    ``Arm BF16``), or None. Linux reads /proc/cpuinfo; other systems ask torch's cpuinfo
    (x86 only). Without oneDNN (mkldnn) in torch, bfloat16 has no fast kernels: None."""
    if not torch.backends.mkldnn.is_available():
        return None
    if platform.system() == "Linux":
        flags = _linux_cpu_flags()
        return next((name for flag, name in LINUX_FLAGS.items() if flag in flags), None)
    if _torch_cpu_has("_is_amx_tile_supported"):
        return "AMX-BF16"
    if _torch_cpu_has("_is_avx512_bf16_supported"):
        return "AVX512-BF16"
    return None


def _linux_cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _torch_cpu_has(probe: str) -> bool:
    """A private ``torch.cpu`` probe (cpuinfo underneath), False where this torch lacks it."""
    check = getattr(torch.cpu, probe, None)
    return bool(check()) if check is not None else False


def decide(feature: str | None, error: float | None) -> DtypeChoice:
    """The choice for a CPU with native bfloat16 ``feature`` (None: none) whose check measured
    ``error`` (None when no check ran, which only happens without the feature)."""
    if feature is None or error is None:
        return DtypeChoice(torch.float32, "no native bf16")
    if error <= BF16_TOLERANCE:
        within = f"bf16 output within {BF16_TOLERANCE:g} of float32: measured {error:.4f}"
        return DtypeChoice(torch.bfloat16, f"CPU has {feature}; {within}")
    outside = f"bf16 output {error:.4f} from float32, over the tolerance {BF16_TOLERANCE:g}"
    return DtypeChoice(torch.float32, f"CPU has {feature}, but {outside}")


def auto_on_cpu(
    key: Hashable, bundle: ModelBundle, reload: Callable[[], ModelBundle]
) -> ModelBundle:
    """``bundle`` (loaded in float32 on the CPU) in the dtype ``auto`` picks, its
    ``dtype_reason`` saying why. The check runs once per ``key`` (the model spec) in this
    process; when it rejects bfloat16, ``reload`` loads the weights again in float32 (the
    cast lost their precision)."""
    choice = _CHOICES.get(key)
    if choice is None:
        feature, error = native_bf16(), None
        if feature is not None:
            reference = _check_frame(bundle)
            bundle = to_bfloat16(bundle)
            error = float((_check_frame(bundle) - reference).abs().mean())
        choice = _CHOICES[key] = decide(feature, error)
        if choice.dtype == torch.float32 and bundle.dtype == torch.bfloat16:
            bundle = reload()
    elif choice.dtype == torch.bfloat16:
        bundle = to_bfloat16(bundle)
    return replace(bundle, dtype_reason=choice.describe())


def to_bfloat16(bundle: ModelBundle) -> ModelBundle:
    """``bundle`` with its modules cast to bfloat16 in place (what loading with
    ``torch_dtype=bfloat16`` gives: none of these models keeps modules in float32)."""
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        module.bfloat16()  # not .to(dtype): diffusers warns on that for every model
    return replace(bundle, dtype=torch.bfloat16)


def _check_frame(bundle: ModelBundle) -> torch.Tensor:
    pipe = StreamPipeline(
        bundle, StreamConfig(width=CHECK_SIZE, height=CHECK_SIZE, use_stream_batch=False)
    )
    pipe.set_prompt(CHECK_PROMPT)
    y, x = torch.meshgrid(
        torch.linspace(0, 1, CHECK_SIZE), torch.linspace(0, 1, CHECK_SIZE), indexing="ij"
    )
    picture = torch.stack([x, y, 0.5 + 0.5 * torch.sin(12 * x * y)])[None]
    return pipe(picture.to(bundle.device, bundle.dtype)).float()
