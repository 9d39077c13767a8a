"""``broadcast-filter doctor``: what this machine offers the runtime, one actionable line each.

Each check returns ``(level, what, hint)`` with level ``ok``, ``warn`` (works, but slower or
missing a feature) or ``fail`` (the filter cannot run); the command exits 1 on any ``fail``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
from collections.abc import Callable
from pathlib import Path

from broadcast_filter.control.config import DaemonConfig
from broadcast_filter.diffusion.spec import ModelSpec, ref_kind

Line = tuple[str, str, str]


def check_torch() -> list[Line]:
    import torch

    lines = [("ok", f"torch {torch.__version__}", "")]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        lines.append(
            ("ok", f"accelerator: CUDA {torch.version.cuda}, {name}, {memory:.0f} GiB", "")
        )
    elif torch.backends.mps.is_available():
        lines.append(("ok", "accelerator: Apple MPS", ""))
    else:
        hint = (
            "the model runs on CPU, far below real time for sd-turbo; install a CUDA build of "
            "torch (https://pytorch.org/get-started/locally/) or use configs/demo.yaml"
        )
        lines.append(("warn", "no CUDA or MPS accelerator", hint))
    return lines


def check_versions() -> list[Line]:
    lines = []
    for package in ("diffusers", "transformers", "huggingface_hub", "av", "numpy", "pyvirtualcam"):
        try:
            lines.append(("ok", f"{package} {importlib.metadata.version(package)}", ""))
        except importlib.metadata.PackageNotFoundError:
            lines.append(("fail", f"{package} is not installed", "pip install -e ."))
    import av

    codec = ".".join(map(str, av.library_versions["libavcodec"]))
    lines.append(("ok", f"FFmpeg libavcodec {codec} (through PyAV)", ""))
    return lines


def check_virtual_camera() -> list[Line]:
    from broadcast_filter.media.sinks import list_virtual_cameras

    cameras = list_virtual_cameras()
    working = [c for c in cameras if c.available]
    if working:
        return [("ok", f"virtual camera: {c.url} ({c.name})", "") for c in working]
    note = cameras[0].note if cameras else ""
    return [("warn", "no virtual camera available (the vcam sink will not open)", note)]


def check_ndi() -> list[Line]:
    try:
        importlib.import_module("NDIlib")
    except ImportError:
        return [("warn", "NDI not available", "pip install -e '.[ndi]' for ndi: sources/sinks")]
    return [("ok", "NDI (ndi-python) available", "")]


def check_models(config: DaemonConfig | None) -> list[Line]:
    from huggingface_hub import constants, try_to_load_from_cache

    from broadcast_filter.diffusion.offline import OFFLINE_MODELS, ShippedModel, default_cache_dir

    lines = [("ok", f"hub cache: {constants.HF_HUB_CACHE}", "")]
    names = [("model", "stabilityai/sd-turbo"), ("taesd", "madebyollin/taesd")]
    if config is not None:
        names = [("model", config.model.id), ("taesd", config.model.taesd)]
        names += [("lcm_lora", config.model.lcm_lora)] + [
            ("lora", n) for n, _ in config.model.loras
        ]
    for role, name in names:
        if name is None:
            continue
        kind = ref_kind(name)
        if kind == "name" and isinstance(OFFLINE_MODELS.get(name), ShippedModel):
            lines.append(("ok", f"{role} {name}: offline model, shipped with the package", ""))
        elif kind == "name" and name in OFFLINE_MODELS:
            lines.append(("ok", f"{role} {name}: offline model, built on first use", ""))
        elif kind == "name":
            known = ", ".join(OFFLINE_MODELS)
            hint = "write a local folder as ./name, a hub model as owner/name"
            lines.append(("fail", f"{role} {name}: not an offline model ({known})", hint))
        elif kind == "hub":
            marker = "model_index.json" if role == "model" else "config.json"
            cached = isinstance(try_to_load_from_cache(name, marker), str)
            if role in ("lcm_lora", "lora"):
                cached = True  # LoRA repos name their file freely; checked on load
            hint = "" if cached else f"downloads on first run (or now: hf download {name})"
            level = "ok" if cached else "warn"
            lines.append((level, f"{role} {name}: {'cached' if cached else 'not cached'}", hint))
        elif Path(name).expanduser().exists():
            lines.append(("ok", f"{role} {name}: local path", ""))
        else:
            lines.append(("fail", f"{role} {name}: no such file or folder", "fix the path"))
    lines.append(("ok", f"offline models cache: {default_cache_dir()}", ""))
    return lines


def check_dtype(config: DaemonConfig | None) -> list[Line]:
    """What ``model.dtype`` resolves to here. ``auto`` on a CPU with native bfloat16 loads
    the model (never downloading it) to run the same accuracy check a start runs."""
    from broadcast_filter.diffusion.models import (
        ModelNotFoundError,
        describe_dtype,
        load_models,
        resolve_device_dtype,
    )
    from broadcast_filter.diffusion.precision import decide, native_bf16

    spec = config.model if config is not None else ModelSpec()
    device, dtype = resolve_device_dtype(spec.device, spec.dtype)
    if spec.dtype != "auto" or device.type != "cpu":
        return [("ok", describe_dtype(spec.dtype, device, dtype), "")]
    feature = native_bf16()
    if feature is None:
        return [("ok", decide(None, None).describe(), "")]
    try:
        bundle = load_models(spec, progress=False, download=False)
    except ModelNotFoundError:
        what = f"dtype auto -> bfloat16 or float32 (CPU has {feature}; checked at model load)"
        return [("ok", what, "not checked now: the model is not on disk yet (see above)")]
    return [("ok", bundle.dtype_reason, "")]


def run_checks(config: DaemonConfig | None, out: Callable[[str], None] = print) -> int:
    """Print every check; return 1 if any failed, else 0."""
    out(
        f"broadcast-filter doctor on {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    lines: list[Line] = []
    for check in (check_torch, check_versions, check_virtual_camera, check_ndi):
        lines += check()
    lines += check_models(config)
    lines += check_dtype(config)
    for level, what, hint in lines:
        out(f"{level:<5} {what}" + (f"\n      -> {hint}" if hint else ""))
    return 1 if any(level == "fail" for level, _, _ in lines) else 0
