"""Acceleration switches for a loaded :class:`ModelBundle`, each measurable on its own.

Load-time choices live in :class:`~broadcast_filter.diffusion.spec.ModelSpec` (dtype
fp16/bf16, TAESD); its :class:`~broadcast_filter.diffusion.spec.Acceleration` switches,
applied here, change how the same weights run:

- ``channels_last``: NHWC memory layout for the convolutional UNet and VAE;
- ``attention``: ``"sdpa"`` (PyTorch's fused scaled-dot-product attention, diffusers' default)
  or ``"classic"`` (explicit softmax(QK^T)V, for comparison);
- ``compile``: ``torch.compile`` of the UNet and the VAE encoder/decoder with static shapes;
- ``cuda_graphs``: with ``compile`` on CUDA, mode ``reduce-overhead`` (CUDA graph replay).

Compiled code is specialised to the shapes it saw: a new resolution, ``frame_buffer_size``,
number of levels or cfg mode (each changes a batch size) compiles again on its first call.
Inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, set by :func:`use_compile_cache`) makes
a second start with the same shapes fast. :func:`warm_up` runs those first calls behind a
progress bar before going on air.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from tqdm.auto import tqdm

from broadcast_filter.diffusion.offline import default_cache_dir
from broadcast_filter.diffusion.spec import Acceleration

if TYPE_CHECKING:
    from broadcast_filter.diffusion.models import ModelBundle
    from broadcast_filter.diffusion.stream import StreamPipeline


def use_compile_cache(folder: str | Path | None = None) -> Path:
    """Point Inductor's compiled-kernel cache at a persistent folder (default: ours)."""
    if folder is None:
        folder = default_cache_dir().parent / "inductor"
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def accelerate(models: ModelBundle, accel: Acceleration) -> ModelBundle:
    """Apply ``accel`` to the bundle's modules in place (once, before building pipelines)."""
    if accel.cuda_graphs and not (accel.compile and models.device.type == "cuda"):
        raise ValueError("cuda_graphs needs compile=True on a CUDA device")
    processor = AttnProcessor2_0() if accel.attention == "sdpa" else AttnProcessor()
    models.unet.set_attn_processor(processor)
    if accel.channels_last:
        models.unet.to(memory_format=torch.channels_last)
        models.vae.to(memory_format=torch.channels_last)
    if accel.compile:
        use_compile_cache(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        mode = "reduce-overhead" if accel.cuda_graphs else None
        models.unet = torch.compile(models.unet, mode=mode, dynamic=False)
        models.vae.encoder = torch.compile(models.vae.encoder, mode=mode, dynamic=False)
        models.vae.decoder = torch.compile(models.vae.decoder, mode=mode, dynamic=False)
    return models


def warm_up(pipe: StreamPipeline, frames: int | None = None, progress: bool = True) -> float:
    """Run throw-away frames through ``pipe`` (compiling kernels, filling allocator caches),
    then restart its stream so live frames start clean. Returns the seconds it took.

    The default frame count covers every batch shape the pipeline uses: priming, the
    steady-state batch, and one more.
    """
    cfg = pipe.config
    count = frames if frames is not None else pipe.levels + 2
    shape = (cfg.frame_buffer_size, 3, cfg.height, cfg.width)
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    image = image.to(pipe.device, pipe.dtype)
    start = time.perf_counter()
    for _ in tqdm(range(count), desc="warm-up", unit="frame", disable=not progress):
        pipe(image if cfg.mode == "img2img" else None)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    pipe.restart()
    return time.perf_counter() - start
