"""Train the demo model: a small latent diffusion model that knows the styles of
:mod:`broadcast_filter.diffusion.demo_styles`, written as the diffusers folder that ships in
``broadcast_filter/diffusion/weights/demo``.

    python scripts/train_tiny.py --threads 1   # 23 min on a shared 2-core CPU, writes the folder
    python scripts/train_tiny.py --quick --out /tmp/demo-smoke   # ~1.5 min, checks the chain

Seeded and reproducible on CPU with the same thread count (``--threads``, default 2) and
library versions. Steps:

1. Procedural images (:func:`~broadcast_filter.diffusion.demo_data.procedural_images`, random
   flips) and, for each, its styled target under every style filter.
2. A TAESD-shaped ``AutoencoderTiny`` trained for reconstruction (L1 + MSE) on 48 px crops of
   inputs and targets; its ``scaling_factor`` makes the latents' std 1. It has TAESD's block
   design with three levels instead of four, so the latent is 4 x H/4 x W/4 (32x32 at the
   demo's 128x128), not SD's H/8: at 1/8 a 128x128 picture has 16x16 latent positions, and
   the held-out pictures came back at 16.6 dB (a wider 32/64-channel autoencoder: 17.1 dB
   after 1000 steps); at 1/4 they reach the figure in docs/benchmarks.md (issue 11). The
   pipeline reads the factor from the autoencoder's config.
3. A seeded random CLIP text encoder (fixed, not trained): each prompt gets distinct hidden
   states. The empty prompt means "no style" (target = the input itself).
4. A ``UNet2DConditionModel`` trained with the epsilon objective on the SD noise schedule,
   min-SNR-5 weighted, on 16x16 crops of the latents (64 px; the styles are local, and a crop
   costs a quarter of the whole 32x32 latent), on two kinds of samples: the noised latent of
   the styled target (plain denoising, what later Stream Batch levels see) and, 60 % of the
   time, the noised latent of the input with the styled target as the clean latent (what the
   first img2img level sees: the input is the structure). Timesteps are drawn mostly in
   [60, 420], where the demo presets put their levels.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from broadcast_filter.diffusion.demo_data import TRAIN_SEED, procedural_images
from broadcast_filter.diffusion.demo_styles import STYLES
from broadcast_filter.diffusion.offline import (
    DEMO_SCHEDULER,
    build_tokenizer,
    save_tiny_autoencoder,
)

# Three levels: latents 4 x H/4 x W/4 (TAESD's blocks, one downsampling fewer; see above).
DEMO_TAESD = {
    "encoder_block_out_channels": (24, 24, 24),
    "decoder_block_out_channels": (32, 32, 32),
    "num_encoder_blocks": (0, 1, 2),
    "num_decoder_blocks": (2, 1, 0),
    "latent_channels": 4,
}
DEMO_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 96),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
DEMO_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}
NO_STYLE = ""  # the unconditional prompt: output = input


@dataclass(frozen=True)
class Budget:
    """Sizes of one training run."""

    images: int
    ae_steps: int
    ae_batch: int
    ae_crop: int  # pixels
    unet_steps: int
    unet_batch: int
    unet_crop: int  # latent positions


FULL = Budget(
    1200, ae_steps=1600, ae_batch=16, ae_crop=48, unet_steps=2000, unet_batch=24, unet_crop=16
)
QUICK = Budget(64, ae_steps=30, ae_batch=8, ae_crop=48, unet_steps=30, unet_batch=8, unet_crop=16)


def log(message: str, started: float) -> None:
    print(f"[{time.monotonic() - started:7.1f} s] {message}", flush=True)


def make_data(budget: Budget, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(N, 3, H, W)`` and their styled targets ``(N, S, 3, H, W)``, in [-1, 1]."""
    images = procedural_images(budget.images, TRAIN_SEED, size)
    flips = np.random.default_rng(TRAIN_SEED).random((len(images), 2)) < 0.5
    images[flips[:, 0]] = images[flips[:, 0], ::-1]
    images[flips[:, 1]] = images[flips[:, 1], :, ::-1]
    targets = np.stack([[f(im) for f in STYLES.values()] for im in images])
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).movedim(-1, -3) * 2 - 1  # noqa: E731
    return to_torch(images), to_torch(targets)


def train_autoencoder(
    inputs: torch.Tensor, targets: torch.Tensor, budget: Budget, started: float
) -> AutoencoderTiny:
    torch.manual_seed(1)
    ae = AutoencoderTiny(**DEMO_TAESD)
    pool = torch.cat([inputs, targets.flatten(0, 1)])
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=budget.ae_steps)
    gen = torch.Generator().manual_seed(2)
    for step in range(budget.ae_steps):
        top, left = torch.randint(pool.shape[-1] - budget.ae_crop + 1, (2,), generator=gen)
        x = pool[torch.randint(len(pool), (budget.ae_batch,), generator=gen)]
        x = x[..., top : top + budget.ae_crop, left : left + budget.ae_crop]  # conv net: crops
        y = ae.decode(ae.encode(x).latents).sample
        loss = F.l1_loss(y, x) + F.mse_loss(y, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == budget.ae_steps - 1:
            psnr = 10 * math.log10(4 / F.mse_loss(y.clamp(-1, 1), x).item())
            log(
                f"autoencoder step {step}: loss {loss.item():.4f}, batch PSNR {psnr:.1f} dB",
                started,
            )
    return ae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(ae: AutoencoderTiny, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([ae.encode(chunk).latents for chunk in images.split(64)])


def text_encoder_and_embeds(out: Path) -> tuple[CLIPTextModel, torch.Tensor]:
    """The fixed text encoder and the hidden states of ``[NO_STYLE, *STYLES]``."""
    tokenizer = build_tokenizer(out / "tokenizer")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **DEMO_TEXT,
    )
    torch.manual_seed(3)
    encoder = CLIPTextModel(config).eval().requires_grad_(False)
    ids = tokenizer(
        [NO_STYLE, *STYLES],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return encoder, encoder(ids)[0]


def sample_timesteps(n: int, gen: torch.Generator) -> torch.Tensor:
    """80 % in [60, 420] (the demo presets' levels, t_index 29..47), 20 % in [1, 999]."""
    near = torch.randint(60, 421, (n,), generator=gen)
    anywhere = torch.randint(1, 1000, (n,), generator=gen)
    return torch.where(torch.rand(n, generator=gen) < 0.8, near, anywhere)


def train_unet(
    z_in: torch.Tensor,
    z_styled: torch.Tensor,
    embeds: torch.Tensor,
    budget: Budget,
    started: float,
) -> UNet2DConditionModel:
    """Train the UNet on ``budget.unet_crop``-square crops of the latents (a conv net; the
    styles are local), one crop position per batch.

    ``z_in`` ``(N, 4, h, w)``, ``z_styled`` ``(N, S, 4, h, w)``, ``embeds`` ``(1 + S, 77, D)``.
    """
    torch.manual_seed(4)
    unet = UNet2DConditionModel(**DEMO_UNET)
    abar = LCMScheduler(**DEMO_SCHEDULER).alphas_cumprod.float()
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=budget.unet_steps)
    gen = torch.Generator().manual_seed(5)
    n, styles = z_styled.shape[:2]
    for step in range(budget.unet_steps):
        b = budget.unet_batch
        idx = torch.randint(n, (b,), generator=gen)
        prompt = torch.randint(styles + 1, (b,), generator=gen)  # 0 = no style
        prompt = torch.where(torch.rand(b, generator=gen) < 0.1, 0, prompt)
        top, left = torch.randint(z_in.shape[-1] - budget.unet_crop + 1, (2,), generator=gen)
        rows, cols = slice(top, top + budget.unet_crop), slice(left, left + budget.unet_crop)
        z_source = z_in[idx][..., rows, cols]
        clean = torch.where(
            (prompt == 0).view(-1, 1, 1, 1),
            z_source,
            z_styled[idx, (prompt - 1).clamp(min=0)][..., rows, cols],
        )
        from_input = (torch.rand(b, generator=gen) < 0.6).view(-1, 1, 1, 1)
        source = torch.where(from_input, z_source, clean)
        t = sample_timesteps(b, gen)
        a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        x_t = a * source + s * torch.randn(source.shape, generator=gen)
        eps_target = (x_t - a * clean) / s
        eps = unet(x_t, t, embeds[prompt]).sample
        snr = (a / s).flatten() ** 2
        weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 on the epsilon loss
        loss = (weight * ((eps - eps_target) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == budget.unet_steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f}", started)
    return unet.eval().requires_grad_(False)


def write_folder(
    out: Path, ae: AutoencoderTiny, unet: UNet2DConditionModel, text_encoder: CLIPTextModel
) -> None:
    """The diffusers folder: ``unet``, ``text_encoder``, ``tokenizer`` (already written),
    ``scheduler``, and the autoencoder as ``vae`` and as ``taesd`` (the same files)."""
    unet.save_pretrained(out / "unet")
    text_encoder.save_pretrained(out / "text_encoder")
    LCMScheduler(**DEMO_SCHEDULER).save_pretrained(out / "scheduler")
    save_tiny_autoencoder(ae, out / "taesd")
    shutil.copytree(out / "taesd", out / "vae", dirs_exist_ok=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.0.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "LCMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderTiny"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("broadcast_filter/diffusion/weights/demo"))
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    parser.add_argument("--size", type=int, default=128, help="training image size")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else FULL
    started = time.monotonic()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)

    inputs, targets = make_data(budget, args.size)
    log(f"data: {len(inputs)} images x {1 + len(STYLES)} versions", started)
    ae = train_autoencoder(inputs, targets, budget, started)
    z_in, z_styled = encode_all(ae, inputs), encode_all(ae, targets.flatten(0, 1))
    scale = 1.0 / float(torch.cat([z_in, z_styled]).std())
    ae.register_to_config(scaling_factor=scale)
    log(f"latent scaling_factor {scale:.4f}", started)
    z_in, z_styled = z_in * scale, (z_styled * scale).unflatten(0, targets.shape[:2])
    text_encoder, embeds = text_encoder_and_embeds(args.out)
    unet = train_unet(z_in, z_styled, embeds, budget, started)
    write_folder(args.out, ae, unet, text_encoder)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    log(f"wrote {args.out} ({size / 1e6:.2f} MB)", started)


if __name__ == "__main__":
    main()
