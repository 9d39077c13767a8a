"""Offline models: Stable Diffusion architectures that need no download.

``demo`` is a small latent diffusion model trained on this machine's CPU by
``scripts/train_tiny.py`` on procedural images and five style filters
(:mod:`broadcast_filter.diffusion.demo_styles`); its diffusers folder ships inside the package.
The others have seeded random weights, built from configs on first use: ``tiny`` (toy sizes,
for tests) and ``sd-turbo-arch`` (sd-turbo's real architecture; compute cost does not depend
on weight values, so throughput measured with it is honest). Every model is an ordinary
diffusers folder (``model_index.json`` + ``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
``scheduler``, plus the tiny autoencoder in ``taesd``) loaded through the same code path as any
local folder (:func:`broadcast_filter.diffusion.models.load_models`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    LCMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers import EulerDiscreteScheduler
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = [
    "OFFLINE_MODELS",
    "OfflineModel",
    "ShippedModel",
    "default_cache_dir",
    "ensure_offline_model",
]

# Bump when a builder or config changes: folders written by another version are rebuilt.
BUILD_VERSION = 2  # 2: tiny autoencoder configs without block_out_channels
MARKER = "broadcast_filter_offline.json"

# The noise schedule shared by SD 1.5 / 2.x (what LCMScheduler.from_config sees).
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

# The LCM scheduler of ``tiny`` and of the trained ``demo`` (scripts/train_tiny.py).
DEMO_SCHEDULER = {
    **SD_SCHEDULER,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
}

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (8, 16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
TINY_TAESD = {
    "encoder_block_out_channels": (16, 16, 16, 16),
    "decoder_block_out_channels": (16, 16, 16, 16),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (1, 1, 1, 1),
    "latent_channels": 4,
}
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}

# stabilityai/sd-turbo (SD 2.1-base architecture), configs as published in its repo.
SD_TURBO_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD_TURBO_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
SD_TURBO_TEXT = {
    "vocab_size": 49408,  # the byte-level tokenizer uses the first 514 ids
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
SD_TURBO_SCHEDULER = {**SD_SCHEDULER, "timestep_spacing": "trailing"}
# madebyollin/taesd: the defaults of AutoencoderTiny.
TAESD_DEFAULT: dict[str, Any] = {}


@dataclass(frozen=True)
class OfflineModel:
    """Configs of one offline model; weights come from ``torch.manual_seed(seed + i)``."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    taesd: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler_class: type[SchedulerMixin]
    scheduler: dict[str, Any]
    seed: int = 0
    save_dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class ShippedModel:
    """A trained model whose diffusers folder ships inside the package."""

    folder: Path


WEIGHTS_DIR = Path(__file__).parent / "weights"

OFFLINE_MODELS: dict[str, OfflineModel | ShippedModel] = {
    # Trained here (scripts/train_tiny.py): knows the five prompts of demo_styles.STYLES.
    "demo": ShippedModel(WEIGHTS_DIR / "demo"),
    # Random weights, toy sizes: fast, for tests of the pipeline's arithmetic.
    "tiny": OfflineModel(
        unet=TINY_UNET,
        vae=TINY_VAE,
        taesd=TINY_TAESD,
        text_encoder=TINY_TEXT,
        scheduler_class=LCMScheduler,
        scheduler=DEMO_SCHEDULER,
    ),
    # Real size (~1.3 B parameters); weights stored in fp16 like the published variant.
    "sd-turbo-arch": OfflineModel(
        unet=SD_TURBO_UNET,
        vae=SD_TURBO_VAE,
        taesd=TAESD_DEFAULT,
        text_encoder=SD_TURBO_TEXT,
        scheduler_class=EulerDiscreteScheduler,
        scheduler=SD_TURBO_SCHEDULER,
        save_dtype=torch.float16,
    ),
}


def default_cache_dir() -> Path:
    """``$BROADCAST_FILTER_CACHE/models`` or ``~/.cache/broadcast_filter/models``."""
    root = os.environ.get("BROADCAST_FILTER_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "broadcast_filter"
    return base / "models"


def ensure_offline_model(
    name: str, cache_dir: str | Path | None = None, *, progress: bool = True
) -> Path:
    """Return the diffusers folder of offline model ``name``, building it on first use.

    A shipped model's folder is returned as it is. A built model's folder is
    ``<cache_dir>/<name>`` (default :func:`default_cache_dir`). It is written to a
    temporary sibling and renamed into place, so a folder that exists is complete.
    """
    if name not in OFFLINE_MODELS:
        raise KeyError(f"unknown offline model {name!r}; known: {', '.join(OFFLINE_MODELS)}")
    spec = OFFLINE_MODELS[name]
    if isinstance(spec, ShippedModel):
        if not (spec.folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"offline model {name!r}: {spec.folder} is missing or incomplete "
                "(reinstall the package, or run scripts/train_tiny.py)"
            )
        return spec.folder
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / name
    if _is_current(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        _build(spec, tmp, name, progress)
        if target.exists():  # stale build from another BUILD_VERSION
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process renamed its build first
            if not _is_current(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_current(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("build_version") == BUILD_VERSION


def _build(spec: OfflineModel, out: Path, name: str, progress: bool) -> None:
    tokenizer = build_tokenizer(out / "tokenizer")
    text_config = CLIPTextConfig(
        **{
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **spec.text_encoder,
        }
    )
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "text_encoder": lambda: CLIPTextModel(text_config),
        "unet": lambda: UNet2DConditionModel(**spec.unet),
        "vae": lambda: AutoencoderKL(**spec.vae),
        "taesd": lambda: AutoencoderTiny(**spec.taesd),
    }
    parts = {}
    bar = tqdm(builders.items(), desc=f"building offline model {name!r}", disable=not progress)
    for i, (part, build) in enumerate(bar):
        bar.set_postfix_str(part)
        torch.manual_seed(spec.seed + i)
        parts[part] = build()
        if spec.save_dtype != torch.float32:  # ModelMixin.to(dtype) warns even when harmless
            parts[part].to(spec.save_dtype)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=tokenizer,
        unet=parts["unet"],
        scheduler=spec.scheduler_class(**spec.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    save_tiny_autoencoder(parts["taesd"], out / "taesd")
    marker = {"name": name, "build_version": BUILD_VERSION, "seed": spec.seed}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def save_tiny_autoencoder(model: AutoencoderTiny, folder: Path) -> None:
    """``save_pretrained`` without the ``block_out_channels`` key diffusers adds to an
    ``AutoencoderTiny`` config for pipelines' use (and then warns about on every load)."""
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("block_out_channels", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _bytes_to_unicode() -> list[str]:
    """The 256 characters byte-level BPE (GPT-2 / CLIP) uses for the bytes, in vocab order."""
    byte_values = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    byte_values += range(ord("®"), ord("ÿ") + 1)
    code_points = byte_values[:]
    unprintable = [b for b in range(256) if b not in byte_values]
    code_points += [256 + i for i in range(len(unprintable))]
    return [chr(c) for c in code_points]


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write and load a byte-level CLIP tokenizer without merges (vocabulary of 514 tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer
