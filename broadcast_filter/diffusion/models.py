"""Load the models the stream pipeline needs: UNet, VAE (or TAESD), CLIP text encoder, tokenizer.

One entry point, :func:`load_models`, takes a :class:`ModelSpec` naming a hub id, a local
diffusers folder, a single ``.safetensors``/``.ckpt`` checkpoint or an offline model
(:data:`~broadcast_filter.diffusion.offline.OFFLINE_MODELS`), optionally fuses an LCM-LoRA and
extra LoRAs, optionally swaps the VAE for a tiny autoencoder, and returns a
:class:`ModelBundle` in eval mode on the requested device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    fetch_diffusers_config,
    load_single_file_checkpoint,
)
from huggingface_hub import is_offline_mode, snapshot_download
from huggingface_hub.constants import HF_HUB_CACHE
from huggingface_hub.errors import EntryNotFoundError
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from broadcast_filter.diffusion.offline import OFFLINE_MODELS, ensure_offline_model
from broadcast_filter.diffusion.precision import auto_on_cpu
from broadcast_filter.diffusion.spec import ModelSpec, ref_kind

__all__ = [
    "ModelBundle",
    "ModelNotFoundError",
    "describe_dtype",
    "load_models",
    "resolve_device_dtype",
]

# Only what load_models reads from a diffusers repo (fp32 safetensors, no variants, no .bin).
PIPELINE_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
]
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
TAESD_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]
LORA_FILES = ["*.safetensors"]
CONFIG_FILES = ["*.json", "*.txt"]  # what from_single_file reads besides the checkpoint
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ModelBundle:
    """Loaded modules, all in eval mode without gradients, on ``device`` in ``dtype``."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | AutoencoderTiny
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: LCMScheduler
    device: torch.device
    dtype: torch.dtype
    name: str
    #: One line on the dtype: ``dtype float32 (as configured)``, ``dtype auto -> ... (why)``.
    dtype_reason: str


class ModelNotFoundError(RuntimeError):
    """A model is neither on disk nor downloadable; the message says where it looked and how
    to download it."""


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Resolve ``auto`` choices: cuda, else mps, else cpu; fp16 on cuda, fp32 elsewhere (the
    dtype to load in: on a CPU, :func:`load_models` may then switch ``auto`` to bf16)."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device.split(":")[0] not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device must be auto, cuda, mps or cpu, not {device!r}")
    resolved = torch.device(device)
    if dtype == "auto":
        return resolved, torch.float16 if resolved.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}, not {dtype!r}")
    return resolved, DTYPES[dtype]


def load_models(spec: ModelSpec, progress: bool = True, *, download: bool = True) -> ModelBundle:
    """Load (downloading if needed), fuse LoRAs, and place every module on device/dtype.

    Every source is resolved first, so a missing LoRA or TAESD fails before any loading.
    With ``download=False`` a hub model that is not in the cache is a
    :class:`ModelNotFoundError` instead of a download (offline models are still built).
    ``dtype: auto`` on a CPU loads in float32, then keeps float32 or casts to bfloat16 after
    a one-off accuracy check (:mod:`~broadcast_filter.diffusion.precision`).
    """
    device, dtype = resolve_device_dtype(spec.device, spec.dtype)
    source = _resolve_model(spec, progress, download)
    adapters = [(spec.lcm_lora, 1.0)] if spec.lcm_lora is not None else []
    adapters += spec.loras
    loras = [
        (_resolve(name, "LoRA", LORA_FILES, spec, progress, download), scale)
        for name, scale in adapters
    ]
    taesd = None
    if spec.taesd is not None:
        taesd = _resolve_taesd(spec.taesd, spec, progress, download)

    if source.is_file():
        pipe = _load_single_file(source, spec, dtype, download)
    else:
        pipe = _load_folder(source, dtype, load_vae=taesd is None)
    if loras:
        _fuse_loras(pipe, loras)
    vae = pipe.vae if taesd is None else AutoencoderTiny.from_pretrained(taesd, torch_dtype=dtype)
    for module in (pipe.unet, vae, pipe.text_encoder):
        module.to(device).eval().requires_grad_(False)
    bundle = ModelBundle(
        unet=pipe.unet,
        vae=vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        device=device,
        dtype=dtype,
        name=_describe(spec),
        dtype_reason=describe_dtype(spec.dtype, device, dtype),
    )
    if spec.dtype == "auto" and device.type == "cpu":
        float32 = replace(spec, dtype="float32")
        bundle = auto_on_cpu(spec, bundle, lambda: load_models(float32, progress=False))
    return bundle


def describe_dtype(asked: str, device: torch.device, dtype: torch.dtype) -> str:
    """``dtype float16 (as configured)`` or ``dtype auto -> float16 (cuda)``."""
    name = str(dtype).removeprefix("torch.")
    if asked != "auto":
        return f"dtype {name} (as configured)"
    return f"dtype auto -> {name} ({device.type})"


def _describe(spec: ModelSpec) -> str:
    parts = [spec.id]
    if spec.lcm_lora is not None:
        parts.append("LCM-LoRA")
    parts += [f"LoRA {Path(name).name}@{scale:g}" for name, scale in spec.loras]
    if spec.taesd is not None:
        parts.append(f"TAESD {spec.taesd}")
    return " + ".join(parts)


def _resolve_model(spec: ModelSpec, progress: bool, download: bool) -> Path:
    """Local folder or checkpoint file for ``spec.id`` (building or downloading it)."""
    files = PIPELINE_FILES if spec.taesd is not None else [*PIPELINE_FILES, VAE_WEIGHTS]
    return _resolve(spec.id, "model", files, spec, progress, download)


def _resolve_taesd(name: str, spec: ModelSpec, progress: bool, download: bool) -> Path:
    """Folder of an ``AutoencoderTiny``: an offline model's ``taesd`` subfolder, a local folder
    (or its ``taesd`` subfolder) or a hub snapshot."""
    folder = _resolve(name, "TAESD", TAESD_FILES, spec, progress, download)
    if not (folder / "config.json").is_file() and (folder / "taesd").is_dir():
        folder = folder / "taesd"
    _require_files(folder, ["config.json"])
    return folder


def _resolve(
    name: str,
    what: str,
    allow_patterns: list[str],
    spec: ModelSpec,
    progress: bool,
    download: bool = True,
) -> Path:
    """What ``name`` refers to (:func:`~broadcast_filter.diffusion.spec.ref_kind`): an
    offline model's folder, a local path that exists, or a hub snapshot restricted to
    ``allow_patterns``. A hub id is never read from a local folder of the same name."""
    kind = ref_kind(name)
    if kind == "name":
        if name not in OFFLINE_MODELS:
            raise ModelNotFoundError(
                f"{what} {name!r} is not an offline model ({', '.join(OFFLINE_MODELS)}); "
                "write a local folder as ./name, a hub model as owner/name"
            )
        return ensure_offline_model(name, spec.cache_dir, progress=progress)
    if kind == "path":
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"{what} {name!r} not found: no such file or folder {path.absolute()}"
            )
        return path
    where = f"the Hugging Face cache at {spec.cache_dir or HF_HUB_CACHE}"
    try:
        folder = Path(
            snapshot_download(
                name,
                allow_patterns=allow_patterns,
                cache_dir=spec.cache_dir,
                local_files_only=not download,
                tqdm_class=None if progress else _SilentTqdm,
            )
        )
    except (OSError, EntryNotFoundError) as error:  # offline, not found, gated, network down
        problem = f"{what} {name!r} is not in {where} and could not be downloaded"
        message = _download_help(f"{problem} ({_reason(error)})", name, allow_patterns, spec)
        raise ModelNotFoundError(message) from None
    missing = [pattern for pattern in allow_patterns if not any(folder.glob(pattern))]
    if missing:  # an interrupted download, or a repo without fp32 .safetensors
        problem = f"{what} {name!r} in {where} is incomplete: nothing matches {', '.join(missing)}"
        raise ModelNotFoundError(_download_help(problem, name, allow_patterns, spec))
    return folder


def _reason(error: Exception) -> str:
    if is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    first_line = str(error).partition("\n")[0]
    return f"{type(error).__name__}: {first_line}"


def _download_help(
    problem: str,
    repo_id: str,
    allow_patterns: list[str],
    spec: ModelSpec,
    alternative: str = "give a local path instead",
) -> str:
    includes = " ".join(f'--include "{pattern}"' for pattern in allow_patterns)
    command = f"hf download {repo_id} {includes}"
    if spec.cache_dir is not None:
        command += f" --cache-dir {spec.cache_dir}"
    return f"{problem}.\nDownload it with:\n  {command}\nor {alternative}."


class _SilentTqdm(tqdm):
    def __init__(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _pipeline(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL | None,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler_config: dict,
) -> StableDiffusionPipeline:
    """A bare pipeline holding the components (for diffusers' LoRA fusing), with an
    ``LCMScheduler`` made from the model's scheduler config."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=LCMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _load_folder(folder: Path, dtype: torch.dtype, load_vae: bool) -> StableDiffusionPipeline:
    """Components of a diffusers folder on CPU (the VAE only if ``load_vae``)."""
    _require_files(folder, ["model_index.json", "unet/config.json", "text_encoder/config.json"])
    return _pipeline(
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
        vae=_vae_class(folder).from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
        if load_vae
        else None,
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        scheduler_config=LCMScheduler.load_config(folder, subfolder="scheduler"),
    )


def _vae_class(folder: Path) -> type[AutoencoderKL] | type[AutoencoderTiny]:
    """The class ``vae/config.json`` names: a KL VAE, or a tiny autoencoder (the demo model)."""
    config = AutoencoderKL.load_config(folder, subfolder="vae")
    return AutoencoderTiny if config.get("_class_name") == "AutoencoderTiny" else AutoencoderKL


def _require_files(folder: Path, names: list[str]) -> None:
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{folder} is not a complete diffusers folder: missing {', '.join(missing)}"
        )


def _load_single_file(
    path: Path, spec: ModelSpec, dtype: torch.dtype, download: bool
) -> StableDiffusionPipeline:
    """An original-layout SD 1.x / 2.x checkpoint, configs from ``single_file_config``."""
    config = spec.single_file_config
    kind = ref_kind(config) if config is not None else "hub"
    if kind == "name":
        config = str(_resolve(config, "single_file_config", [], spec, progress=False))
    elif kind == "path" and not Path(config).expanduser().is_dir():
        raise ModelNotFoundError(f"single_file_config {config!r} not found: no such folder")
    offline = kind != "hub" or not download
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=config,
            local_files_only=offline,
            cache_dir=spec.cache_dir,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            torch_dtype=dtype,
        )
    except OSError as error:  # configs neither on disk nor downloadable
        if config is None:  # diffusers guessed the family from the checkpoint's keys
            checkpoint = load_single_file_checkpoint(str(path))
            config = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
        problem = (
            f"single-file checkpoint {path} needs the configs of {config!r}, which are not in "
            f"the Hugging Face cache at {spec.cache_dir or HF_HUB_CACHE} and could not be "
            f"downloaded ({_reason(error)})"
        )
        alternative = "pass single_file_config=<local diffusers folder of the same architecture>"
        message = _download_help(problem, config, CONFIG_FILES, spec, alternative)
        raise ModelNotFoundError(message) from None
    return _pipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.config)


def _fuse_loras(pipe: StableDiffusionPipeline, loras: list[tuple[Path, float]]) -> None:
    """Fuse ``W += scale * alpha / rank * B @ A`` for every LoRA, then drop the adapters."""
    names = [f"lora{i}" for i in range(len(loras))]
    for adapter, (path, _) in zip(names, loras, strict=True):
        if path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
        else:
            pipe.load_lora_weights(str(path), adapter_name=adapter)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
