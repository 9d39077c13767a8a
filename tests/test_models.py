"""Model loading: the offline tiny model, LoRA fusing, TAESD, single-file checkpoints, errors.

Everything runs offline against models built into a temporary cache; the real ~/.cache is
never touched. Nothing can be downloaded here, so hub ids are exercised with HF_HUB_OFFLINE=1:
loading from a hub cache laid out as ``hf download`` leaves it, and the errors when it is
missing or incomplete. The download itself is huggingface_hub's ``snapshot_download``.
Loads whose weights are compared pin ``dtype="float32"``: ``auto`` may pick bfloat16 on a CPU
with native support (tests/test_dtype_auto.py), and these tests are about the loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from broadcast_filter.diffusion.models import (
    ModelBundle,
    ModelNotFoundError,
    load_models,
    resolve_device_dtype,
)
from broadcast_filter.diffusion.offline import (
    OFFLINE_MODELS,
    default_cache_dir,
    ensure_offline_model,
)
from broadcast_filter.diffusion.spec import ModelSpec

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="session")
def cache(model_cache: str) -> Path:
    return Path(model_cache)


@pytest.fixture(scope="session")
def tiny(cache: Path) -> Path:
    return ensure_offline_model("tiny", cache)


@pytest.fixture(scope="session")
def bundle(cache: Path, tiny: Path) -> ModelBundle:
    return load_models(ModelSpec(id="tiny", dtype="float32", cache_dir=str(cache)), progress=False)


def assert_same_weights(actual: torch.nn.Module | dict, expected: torch.nn.Module | dict) -> None:
    actual = actual if isinstance(actual, dict) else actual.state_dict()
    expected = expected if isinstance(expected, dict) else expected.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


# ---------------------------------------------------------------- offline tiny model


def test_tiny_folder_is_an_ordinary_diffusers_folder(tiny: Path) -> None:
    index = json.loads((tiny / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "taesd"):
        assert (tiny / sub).is_dir(), sub
    assert (tiny / "tokenizer" / "vocab.json").is_file()
    assert (tiny / "tokenizer" / "merges.txt").read_text() == "#version: 0.2\n"
    # Loadable by diffusers itself, not only by our loader.
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert not list(tiny.parent.glob(".tiny-*")), "temporary build folder left behind"


def test_tiny_is_built_once_and_loads_identically(cache: Path, tiny: Path, bundle) -> None:
    weights = tiny / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_offline_model("tiny", cache) == tiny
    again = load_models(ModelSpec(id="tiny", dtype="float32", cache_dir=str(cache)), progress=False)
    assert weights.stat().st_mtime_ns == before, "the cached model was rebuilt"
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(again, name), getattr(bundle, name))
    assert_same_weights(bundle.unet, load_file(weights))


def test_tiny_weights_are_deterministic_across_builds(tiny: Path, tmp_path: Path) -> None:
    other = ensure_offline_model("tiny", tmp_path)
    for file in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert_same_weights(load_file(other / file), load_file(tiny / file))
    assert_same_weights(
        load_file(other / "taesd" / "diffusion_pytorch_model.safetensors"),
        load_file(tiny / "taesd" / "diffusion_pytorch_model.safetensors"),
    )


def test_stale_build_is_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "broadcast_filter_offline.json").write_text('{"build_version": -1}')
    assert ensure_offline_model("tiny", tmp_path) == folder
    assert (folder / "unet" / "config.json").is_file()


def test_bundle_contract(bundle: ModelBundle) -> None:
    assert isinstance(bundle.unet, UNet2DConditionModel)
    assert isinstance(bundle.vae, AutoencoderKL)
    assert isinstance(bundle.text_encoder, CLIPTextModel)
    assert isinstance(bundle.tokenizer, CLIPTokenizer)
    assert isinstance(bundle.scheduler, LCMScheduler)
    assert (bundle.device, bundle.dtype, bundle.name) == (
        torch.device("cpu"),
        torch.float32,
        "tiny",
    )
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        assert not module.training
        for param in module.parameters():
            assert not param.requires_grad
            assert (param.device.type, param.dtype) == ("cpu", torch.float32)
    config = bundle.scheduler.config
    assert config.num_train_timesteps == 1000
    assert (config.beta_start, config.beta_end) == (0.00085, 0.012)
    assert config.beta_schedule == "scaled_linear"
    assert config.timestep_spacing == "leading"
    assert config.prediction_type == "epsilon"


def test_tiny_runs_a_64px_step(bundle: ModelBundle) -> None:
    ids = bundle.tokenizer(
        ["a watercolour fox"],
        padding="max_length",
        max_length=bundle.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        embeds = bundle.text_encoder(ids)[0]
        latents = bundle.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
        eps = bundle.unet(latents, 500, encoder_hidden_states=embeds).sample
        image = bundle.vae.decode(latents).sample
    assert embeds.shape == (1, 77, 32)
    assert latents.shape == (1, 4, 8, 8), "VAE factor must be 8"
    assert eps.shape == latents.shape
    assert image.shape == (1, 3, 64, 64)


def test_tiny_tokenizer_is_byte_level(bundle: ModelBundle) -> None:
    tokenizer = bundle.tokenizer
    assert len(tokenizer) == 514
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer("Neon city, ÄÖ!").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 2 + len("neoncity,äö!".encode())  # one token per byte, spaces dropped
    assert tokenizer.decode(ids, skip_special_tokens=True) == "neon city , äö !"


def test_offline_names_and_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert {"tiny", "sd-turbo-arch"} <= set(OFFLINE_MODELS)
    monkeypatch.setenv("BROADCAST_FILTER_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("BROADCAST_FILTER_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "broadcast_filter" / "models"
    with pytest.raises(KeyError, match="unknown offline model 'huge'"):
        ensure_offline_model("huge", tmp_path)


def test_sd_turbo_arch_has_the_published_parameter_counts() -> None:
    """Same architecture as stabilityai/sd-turbo (SD 2.1-base), checked on the meta device."""
    spec = OFFLINE_MODELS["sd-turbo-arch"]
    with init_empty_weights():
        unet = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae)
        text = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [865_910_724, 83_653_863, 340_387_840]


# ---------------------------------------------------------------- device / dtype


def test_resolve_device_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_device_dtype("cuda:1", "float32") == (torch.device("cuda:1"), torch.float32)
    assert resolve_device_dtype("cuda", "auto") == (torch.device("cuda"), torch.float16)
    assert resolve_device_dtype("mps", "auto") == (torch.device("mps"), torch.float32)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device_dtype("auto", "auto") == (torch.device("mps"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device_dtype("auto", "auto") == (torch.device("cuda"), torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        resolve_device_dtype("cpu", "float8")
    with pytest.raises(ValueError, match="device"):
        resolve_device_dtype("tpu", "auto")


def test_load_in_bfloat16(cache: Path, bundle: ModelBundle) -> None:
    half = load_models(ModelSpec(id="tiny", dtype="bfloat16", cache_dir=str(cache)), False)
    assert half.dtype == torch.bfloat16
    for name in ("unet", "vae", "text_encoder"):
        for key, value in getattr(half, name).state_dict().items():
            assert value.dtype == torch.bfloat16, key
    assert torch.equal(half.unet.conv_in.weight, bundle.unet.conv_in.weight.to(torch.bfloat16))


# ---------------------------------------------------------------- LoRA / LCM-LoRA


def make_lora(tiny: Path, out: Path, seed: int, rank: int, alpha: int, text: bool) -> dict:
    """A random LoRA for the tiny model saved with diffusers' ``save_lora_weights``; returns
    ``{weight key: alpha / rank * B @ A}`` per targeted module."""
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny, subfolder="text_encoder")
    # init_lora_weights=False: B is random too (the default B = 0 would fuse to nothing).
    unet_config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS, init_lora_weights=False
    )
    torch.manual_seed(seed)
    unet.add_adapter(unet_config)
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
    metadata = {"unet_lora_adapter_metadata": unet_config.to_dict()}
    deltas = lora_deltas(layers["unet_lora_layers"], "unet", alpha / rank)
    if text:
        text_config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=TEXT_TARGETS, init_lora_weights=False
        )
        inject_adapter_in_model(text_config, text_encoder)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(text_encoder)
        metadata["text_encoder_lora_adapter_metadata"] = text_config.to_dict()
        deltas |= lora_deltas(layers["text_encoder_lora_layers"], "text_encoder", alpha / rank)
    StableDiffusionPipeline.save_lora_weights(out, **layers, **metadata)
    return deltas


def lora_deltas(layers: dict, component: str, scaling: float) -> dict:
    deltas = {}
    for module in {key.rsplit(".lora_", 1)[0] for key in layers}:
        down, up = layers[f"{module}.lora_A.weight"], layers[f"{module}.lora_B.weight"]
        deltas[f"{component}.{module}.weight"] = scaling * up @ down
    return deltas


def fused_changes(bundle: ModelBundle, base: ModelBundle) -> dict[str, torch.Tensor]:
    """``{component.key: new - old}`` for every weight that changed."""
    changes = {}
    for name in ("unet", "vae", "text_encoder"):
        new, old = getattr(bundle, name).state_dict(), getattr(base, name).state_dict()
        assert new.keys() == old.keys(), f"{name}: adapter layers left behind"
        changes |= {f"{name}.{k}": new[k] - old[k] for k in old if not torch.equal(new[k], old[k])}
    return changes


@pytest.mark.parametrize("text_keys", ["current", "legacy"])
def test_lora_is_fused_with_its_scale(
    cache: Path, tiny: Path, bundle, tmp_path: Path, text_keys: str
) -> None:
    deltas = make_lora(tiny, tmp_path / "style", seed=1, rank=4, alpha=8, text=True)
    assert any(key.startswith("text_encoder.") for key in deltas)
    if text_keys == "legacy":  # LoRAs made with transformers 4 name text keys `text_model.*`
        file = tmp_path / "style" / "pytorch_lora_weights.safetensors"
        with safe_open(file, "pt") as f:
            metadata = f.metadata()
        layers = {
            key.replace("text_encoder.", "text_encoder.text_model.", 1): value
            for key, value in load_file(file).items()
        }
        save_file(layers, file, metadata=metadata)
    spec = ModelSpec(
        id="tiny", dtype="float32", loras=((str(tmp_path / "style"), 0.5),), cache_dir=str(cache)
    )
    fused = load_models(spec, progress=False)
    changes = fused_changes(fused, bundle)
    assert changes.keys() == deltas.keys()  # exactly the targets changed, every one of them
    for key, delta in deltas.items():
        torch.testing.assert_close(changes[key], 0.5 * delta, rtol=1e-4, atol=1e-6)
    assert fused.name == "tiny + LoRA style@0.5"


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # 2 adapters
def test_lcm_lora_and_extra_lora_add_up(cache: Path, tiny: Path, bundle, tmp_path: Path) -> None:
    lcm = make_lora(tiny, tmp_path / "lcm", seed=2, rank=8, alpha=8, text=False)
    extra = make_lora(tiny, tmp_path / "extra", seed=3, rank=2, alpha=1, text=False)
    lcm_file = tmp_path / "lcm" / "pytorch_lora_weights.safetensors"  # a file path works too
    spec = ModelSpec(
        id="tiny",
        dtype="float32",
        lcm_lora=str(lcm_file),
        loras=((str(tmp_path / "extra"), -1.5),),
        cache_dir=str(cache),
    )
    changes = fused_changes(load_models(spec, progress=False), bundle)
    assert changes.keys() == lcm.keys() == extra.keys()
    for key in lcm:
        torch.testing.assert_close(changes[key], lcm[key] - 1.5 * extra[key], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- TAESD


@pytest.mark.parametrize("where", ["name", "folder", "parent"])
def test_taesd(cache: Path, tiny: Path, where: str) -> None:
    taesd = {"name": "tiny", "folder": str(tiny / "taesd"), "parent": str(tiny)}[where]
    loaded = load_models(
        ModelSpec(id="tiny", dtype="float32", taesd=taesd, cache_dir=str(cache)), False
    )
    assert isinstance(loaded.vae, AutoencoderTiny)
    assert not loaded.vae.training
    assert_same_weights(
        loaded.vae, load_file(tiny / "taesd" / "diffusion_pytorch_model.safetensors")
    )
    with torch.no_grad():
        latents = loaded.vae.encode(torch.zeros(1, 3, 64, 64)).latents
        assert latents.shape == (1, 4, 8, 8)
        assert loaded.vae.decode(latents).sample.shape == (1, 3, 64, 64)


# ---------------------------------------------------------------- single-file checkpoints
# The diffusers -> original SD (ldm) key mapping below follows diffusers'
# scripts/convert_diffusers_to_original_stable_diffusion.py, generalised from its hard-coded
# 4 levels x 2 layers to any config, and updated to today's diffusers VAE attention names.

RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION_TO_LDM = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out": "proj_out",
}


def rename(state: dict, prefixes: list[tuple[str, str]], parts: dict) -> dict:
    """Replace the first matching prefix of each key; ``parts[prefix]`` renames the next part."""
    out = {}
    for key, value in state.items():
        hf, ldm = next((p for p in prefixes if key.startswith(p[0])), (key, key))
        assert hf != key, f"unmapped key {key}"
        head, _, tail = key[len(hf) :].partition(".")
        head = parts.get(hf, {}).get(head, head)
        if parts.get(hf) is VAE_ATTENTION_TO_LDM:
            tail = tail.removeprefix("0.")  # to_out.0.weight -> proj_out.weight
            if tail == "weight" and value.ndim == 2:
                value = value[:, :, None, None]  # ldm uses 1x1 convolutions here
        out[ldm + head + "." + tail if tail else ldm + head] = value
    return out


def unet_to_ldm(unet: UNet2DConditionModel) -> dict:
    config, per_level = unet.config, unet.config.layers_per_block + 1
    prefixes = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i, up_type in enumerate(config.up_block_types):
        for j in range(config.layers_per_block):
            block = 1 + i * per_level + j
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0."))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1."))
        prefixes.append(
            (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per_level}.0.op.")
        )
        for j in range(per_level):
            block = i * per_level + j
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1."))
        upsample = 2 if up_type.startswith("CrossAttn") else 1
        prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{block}.{upsample}."))
    parts = {hf: RESNET_TO_LDM for hf, _ in prefixes if ".resnets." in hf}
    state = rename(unet.state_dict(), prefixes, parts)
    return {f"model.diffusion_model.{key}": value for key, value in state.items()}


def vae_to_ldm(vae: AutoencoderKL) -> dict:
    levels = len(vae.config.block_out_channels)
    prefixes = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for coder in ("encoder", "decoder"):
        prefixes += [
            (f"{coder}.conv_in.", f"{coder}.conv_in."),
            (f"{coder}.conv_out.", f"{coder}.conv_out."),
            (f"{coder}.conv_norm_out.", f"{coder}.norm_out."),
            (f"{coder}.mid_block.resnets.0.", f"{coder}.mid.block_1."),
            (f"{coder}.mid_block.resnets.1.", f"{coder}.mid.block_2."),
            (f"{coder}.mid_block.attentions.0.", f"{coder}.mid.attn_1."),
        ]
    for i in range(levels):
        up = levels - 1 - i  # ldm numbers decoder levels from the bottom
        prefixes.append(
            (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
        )
        prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample."))
        for j in range(vae.config.layers_per_block + 1):
            prefixes.append(
                (f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.")
            )
            prefixes.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}."))
    parts = {hf: {"conv_shortcut": "nin_shortcut"} for hf, _ in prefixes if ".resnets." in hf}
    parts |= {hf: VAE_ATTENTION_TO_LDM for hf, _ in prefixes if ".attentions." in hf}
    state = rename(vae.state_dict(), prefixes, parts)
    return {f"first_stage_model.{key}": value for key, value in state.items()}


def clip_to_ldm(text_encoder: CLIPTextModel) -> dict:
    """SD 1.x layout: the transformers CLIP keys under ``cond_stage_model.transformer.``."""
    return {
        f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}": value
        for key, value in text_encoder.state_dict().items()
    }


def open_clip_to_ldm(text_encoder: CLIPTextModel) -> dict:
    """SD 2.x layout: OpenCLIP names and fused q/k/v under ``cond_stage_model.model.``."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    hidden = text_encoder.config.hidden_size
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": torch.randn(hidden, hidden),  # OpenCLIP's; SD 2 loaders drop it
    }
    names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    names["self_attn.out_proj"] = "attn.out_proj"
    for i in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
            for hf, ldm in names.items():
                out[f"{block}{ldm}.{kind}"] = state.pop(f"{layer}{hf}.{kind}")
    assert not state, f"unmapped text encoder keys {list(state)}"
    return {f"cond_stage_model.model.{key}": value for key, value in out.items()}


@pytest.mark.parametrize(
    ("family", "suffix"), [("sd15", ".safetensors"), ("sd15", ".ckpt"), ("sd2", ".safetensors")]
)
def test_single_file_round_trip(
    cache: Path, tiny: Path, bundle: ModelBundle, tmp_path: Path, family: str, suffix: str
) -> None:
    text = clip_to_ldm if family == "sd15" else open_clip_to_ldm
    checkpoint = unet_to_ldm(bundle.unet) | vae_to_ldm(bundle.vae) | text(bundle.text_encoder)
    checkpoint = {key: value.contiguous() for key, value in checkpoint.items()}
    path = tmp_path / f"tiny-{family}{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": checkpoint}, path)
    else:
        save_file(checkpoint, path)
    # Configs only, no weights: every loaded weight must come from the checkpoint.
    config = tmp_path / "config"
    shutil.copytree(tiny, config, ignore=shutil.ignore_patterns("*.safetensors"))
    spec = ModelSpec(
        id=str(path), dtype="float32", single_file_config=str(config), cache_dir=str(cache)
    )
    loaded = load_models(spec, progress=False)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(loaded, name), getattr(bundle, name))
    assert loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    assert loaded.scheduler.config == bundle.scheduler.config


# ---------------------------------------------------------------- missing models


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 (huggingface_hub reads the variable at import, so patch both)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def missing(spec: ModelSpec) -> str:
    with pytest.raises(ModelNotFoundError) as info:
        load_models(spec, progress=False)
    error = info.value  # one clear error, no chained traceback from huggingface_hub
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return str(info.value)


@pytest.mark.usefixtures("offline")
def test_missing_hub_model(tmp_path: Path) -> None:
    message = missing(ModelSpec(id="stabilityai/sd-turbo", cache_dir=str(tmp_path)))
    assert "model 'stabilityai/sd-turbo' is not in the Hugging Face cache" in message
    assert str(tmp_path) in message and "HF_HUB_OFFLINE=1" in message
    command = (
        'hf download stabilityai/sd-turbo --include "model_index.json" '
        '--include "scheduler/scheduler_config.json" --include "tokenizer/*" '
        '--include "text_encoder/config.json" --include "text_encoder/model.safetensors" '
        '--include "unet/config.json" --include "unet/diffusion_pytorch_model.safetensors" '
        '--include "vae/config.json" --include "vae/diffusion_pytorch_model.safetensors" '
        f"--cache-dir {tmp_path}"
    )
    assert f"Download it with:\n  {command}\n" in message
    assert list(tmp_path.iterdir()) == [] or not any(tmp_path.rglob("*.safetensors"))


@pytest.mark.usefixtures("offline")
def test_missing_hub_model_with_taesd_skips_the_vae_weights(tiny: Path, tmp_path: Path) -> None:
    spec = ModelSpec(id="Lykon/dreamshaper-8", taesd=str(tiny), cache_dir=str(tmp_path))
    message = missing(spec)
    assert "hf download Lykon/dreamshaper-8 " in message
    assert "vae/config.json" in message and "vae/diffusion_pytorch_model" not in message


@pytest.mark.parametrize(
    "name", ["./no/such/model.safetensors", "/no/such/folder", "~/no/such.ckpt"]
)
def test_missing_local_path(name: str) -> None:
    message = missing(ModelSpec(id=name))
    assert f"model {name!r} not found: no such file or folder" in message
    assert str(Path(name).expanduser().absolute()) in message


def test_incomplete_local_folder(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    message = missing(ModelSpec(id=str(tmp_path)))
    assert f"{tmp_path} is not a complete diffusers folder: missing model_index.json" in message


@pytest.mark.usefixtures("offline")
def test_missing_lora_and_taesd(cache: Path, tmp_path: Path) -> None:
    lcm = "latent-consistency/lcm-lora-sdv1-5"
    message = missing(ModelSpec(id="tiny", lcm_lora=lcm, cache_dir=str(cache)))
    assert f"LoRA {lcm!r} is not in the Hugging Face cache at {cache}" in message
    assert f'hf download {lcm} --include "*.safetensors" --cache-dir {cache}' in message
    lora = tmp_path / "style.safetensors"
    message = missing(ModelSpec(id="tiny", loras=((str(lora), 1.0),), cache_dir=str(cache)))
    assert f"LoRA {str(lora)!r} not found: no such file or folder {lora}" in message
    message = missing(ModelSpec(id="tiny", taesd="madebyollin/taesd", cache_dir=str(cache)))
    assert f"TAESD 'madebyollin/taesd' is not in the Hugging Face cache at {cache}" in message
    assert (
        'hf download madebyollin/taesd --include "config.json" '
        '--include "diffusion_pytorch_model.safetensors"'
    ) in message


@pytest.mark.usefixtures("offline")
def test_single_file_without_config_offline(
    cache: Path, bundle: ModelBundle, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    checkpoint = (
        unet_to_ldm(bundle.unet) | vae_to_ldm(bundle.vae) | clip_to_ldm(bundle.text_encoder)
    )
    save_file({key: value.contiguous() for key, value in checkpoint.items()}, path)
    message = missing(ModelSpec(id=str(path), cache_dir=str(tmp_path)))
    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers' guess for SD 1.x keys
    assert (
        f"single-file checkpoint {path} needs the configs of {repo!r}, which are not in the "
        f"Hugging Face cache at {tmp_path} and could not be downloaded" in message
    )
    command = f'hf download {repo} --include "*.json" --include "*.txt" --cache-dir {tmp_path}'
    assert f"Download it with:\n  {command}\nor pass single_file_config=" in message
    message = missing(ModelSpec(id=str(path), single_file_config="./no/such/config"))
    assert "single_file_config './no/such/config' not found: no such folder" in message
    # An offline model's name works as the config too.
    spec = ModelSpec(id=str(path), dtype="float32", single_file_config="tiny", cache_dir=str(cache))
    assert_same_weights(load_models(spec, progress=False).unet, bundle.unet)


def fake_hub_snapshot(cache: Path, repo_id: str, source: Path, skip: str = "") -> Path:
    """Lay ``source`` out as huggingface_hub's cache does after ``hf download repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit, ignore=shutil.ignore_patterns(skip))
    return repo / "snapshots" / commit


@pytest.mark.usefixtures("offline")
def test_hub_id_loads_from_the_hub_cache(tiny: Path, bundle: ModelBundle, tmp_path: Path) -> None:
    fake_hub_snapshot(tmp_path, "someone/tiny-sd", tiny)
    loaded = load_models(
        ModelSpec(id="someone/tiny-sd", dtype="float32", cache_dir=str(tmp_path)), False
    )
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(loaded, name), getattr(bundle, name))
    assert loaded.name == "someone/tiny-sd"


@pytest.mark.usefixtures("offline")
def test_incomplete_hub_snapshot(tiny: Path, tmp_path: Path) -> None:
    fake_hub_snapshot(tmp_path, "someone/tiny-sd", tiny, skip="model.safetensors")
    message = missing(ModelSpec(id="someone/tiny-sd", cache_dir=str(tmp_path)))
    assert (
        f"model 'someone/tiny-sd' in the Hugging Face cache at {tmp_path} is incomplete" in message
    )
    assert "nothing matches text_encoder/model.safetensors" in message
    assert "Download it with:\n  hf download someone/tiny-sd --include" in message
