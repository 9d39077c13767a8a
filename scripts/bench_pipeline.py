"""Throughput of the stream pipeline against its alternatives, measured side by side.

For each model, every variant runs one frame per round, round-robin, so slow drifts of a
shared machine hit all variants alike; the per-variant figure is the median frame time.

Ratios printed (>1 means the first named is faster):
  stream_batch_speedup     Stream Batch vs sequential denoising (same levels, cfg none)
  rcfg_self_speedup        cfg "self" vs "full" (both Stream Batch)
  rcfg_initialize_speedup  cfg "initialize" vs "full"
  vs_diffusers_speedup     ours vs diffusers' AutoPipelineForImage2Image called per frame,
                           same weights, timesteps and guidance (1.0)
  floor_ratio              ours (cfg none) vs a bare loop of VAE encode + the same UNet batch
                           + VAE decode; 1.0 means no overhead at all

    python scripts/bench_pipeline.py                       # tiny 128x128 + sd-turbo-arch 256x256
    python scripts/bench_pipeline.py --json --models tiny --size 64
    python scripts/bench_pipeline.py --temporal --models sd-turbo-arch:256   # issue 13's cost
    python scripts/bench_pipeline.py --streams 1 2 4       # several streams, batched or not
    python scripts/bench_pipeline.py --demo configs/demo.yaml --rounds 60   # the demo as shipped

With ``--temporal`` the variants are cfg "self" with each temporal technique off / on
(:data:`TEMPORAL`), the ratios are each variant's frame time over off's, and the memory the
attention cache holds per cached frame is reported. The attention processors of the UNet
are wrapped once for the cache variants; off runs through the same (idle) wrappers.

With ``--streams N...`` the variants are, for each N, N streams on one model (each its own
pipeline, prompt and seed; 2 levels, cfg self, Stream Batch) run ``batched`` (one UNet call
per round for all, :func:`~broadcast_filter.diffusion.batch.drive_together`) and
``one_by_one`` (each stream's frame on its own); aggregate fps counts every stream's frames.

With ``--demo CONFIG`` the demo is measured as configured: the config's model (its dtype,
acceleration), resolution and presets folder, each model preset through the engine as the
daemon runs it, offline on a moving test pattern (``testsrc``, one new frame per call), once as
the preset is written and once with its ``temporal:`` section off, round-robin. SSF is off, so
every frame runs the model (SSF only ever saves frames); the figures are model frames per
second. It runs on the main thread, where the daemon runs its engine on a thread of its own
(docs/benchmarks.md, issue 11: on a 2-core CPU that thread is slower).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, AutoPipelineForImage2Image, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from broadcast_filter.control.config import load_config
from broadcast_filter.control.presets import SsfSettings, load_preset
from broadcast_filter.diffusion.batch import drive_together
from broadcast_filter.diffusion.demo_data import lavfi_frames
from broadcast_filter.diffusion.models import ModelBundle, load_models
from broadcast_filter.diffusion.spec import ModelSpec
from broadcast_filter.diffusion.stream import StreamConfig, StreamPipeline
from broadcast_filter.diffusion.temporal_settings import TemporalSettings
from broadcast_filter.runtime.engine import Engine, load_bundle, load_engine

PROMPT = "an oil painting of a face, warm light"
#: ``--temporal`` variants.
TEMPORAL = {
    "off": TemporalSettings(),
    "feedback": TemporalSettings(feedback=0.15),
    "flow_blend": TemporalSettings(flow_blend=0.5),
    "cache_1": TemporalSettings(cache_frames=1),
    "cache_2": TemporalSettings(cache_frames=2),
    "cache_4": TemporalSettings(cache_frames=4),
    "all": TemporalSettings(feedback=0.15, flow_blend=0.5, cache_frames=2),
}


def stream_variant(
    models: ModelBundle, size: int, levels: tuple[int, ...], **kw: object
) -> Callable[[torch.Tensor], object]:
    pipe = StreamPipeline(
        models, StreamConfig(width=size, height=size, t_index_list=levels, guidance_scale=1.4, **kw)
    )
    pipe.set_prompt(PROMPT, "blurry")
    return pipe


def diffusers_variant(models: ModelBundle, levels: tuple[int, ...]) -> Callable:
    base = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=models.tokenizer,
        unet=models.unet,
        scheduler=models.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = AutoPipelineForImage2Image.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    models.scheduler.set_timesteps(50)
    timesteps = [int(models.scheduler.timesteps[i]) for i in levels]

    def run(image: torch.Tensor) -> object:
        return pipe(
            PROMPT,
            image=image,
            timesteps=timesteps,
            strength=1.0,
            guidance_scale=1.0,
            output_type="pt",
        ).images

    return run


def floor_variant(models: ModelBundle, size: int, levels: tuple[int, ...]) -> Callable:
    """VAE encode + one UNet call on a batch of ``len(levels)`` latents + VAE decode, nothing
    else: the same tensors and shapes as the pipeline's Stream Batch step (random latents
    stand in for the frames in flight)."""
    pipe = stream_variant(models, size, levels, cfg_type="none")
    n = len(levels)
    hidden = pipe.encode_prompt(PROMPT).cond.expand(n, -1, -1)
    timesteps = pipe._schedule.timesteps
    g = torch.Generator().manual_seed(0)
    in_flight = torch.randn((n - 1, *pipe._latent_shape), generator=g)
    in_flight = in_flight.to(models.device, models.dtype)
    vae, unet = models.vae, models.unet
    tiny = isinstance(vae, AutoencoderTiny)

    @torch.inference_mode()
    def run(image: torch.Tensor) -> object:
        encoded = vae.encode(image * 2 - 1)
        z = encoded.latents if tiny else encoded.latent_dist.mode()
        x0 = unet(torch.cat([z, in_flight]), timesteps, hidden).sample
        return vae.decode(x0[-1:]).sample

    return run


def measure(variants: dict[str, Callable], image: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per frame of each variant, run round-robin after one warm-up frame."""
    sync = torch.cuda.synchronize if image.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():
        run(image)
    for _ in range(rounds):
        for name, run in variants.items():
            sync()
            start = time.perf_counter()
            run(image)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run_info(models: ModelBundle, size: int, levels: tuple[int, ...], rounds: int) -> dict:
    """What every result says about its run: model, size, levels, device, dtype, threads."""
    return {
        "model": models.name,
        "size": f"{size}x{size}",
        "levels": list(levels),
        "device": str(models.device),
        "dtype": str(models.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
    }


def bench_model(spec: ModelSpec, size: int, rounds: int) -> dict:
    models = load_models(spec, progress=True)
    levels = (32, 45)
    image = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0))
    image = image.to(models.device, models.dtype)
    variants = {
        "stream_none": stream_variant(models, size, levels, cfg_type="none"),
        "sequential_none": stream_variant(
            models, size, levels, cfg_type="none", use_stream_batch=False
        ),
        "stream_self": stream_variant(models, size, levels, cfg_type="self"),
        "stream_initialize": stream_variant(models, size, levels, cfg_type="initialize"),
        "stream_full": stream_variant(models, size, levels, cfg_type="full"),
        "diffusers_img2img": diffusers_variant(models, levels),
        "floor": floor_variant(models, size, levels),
    }
    with torch.inference_mode():
        seconds = measure(variants, image, rounds)
    fps = {name: 1.0 / s for name, s in seconds.items()}
    return {
        **run_info(models, size, levels, rounds),
        "fps": {k: round(v, 3) for k, v in fps.items()},
        "stream_batch_speedup": round(fps["stream_none"] / fps["sequential_none"], 3),
        "rcfg_self_speedup": round(fps["stream_self"] / fps["stream_full"], 3),
        "rcfg_initialize_speedup": round(fps["stream_initialize"] / fps["stream_full"], 3),
        "vs_diffusers_speedup": round(fps["stream_none"] / fps["diffusers_img2img"], 3),
        "floor_ratio": round(fps["stream_none"] / fps["floor"], 3),
    }


def bench_temporal(spec: ModelSpec, size: int, rounds: int) -> dict:
    models = load_models(spec, progress=True)
    levels = (32, 45)
    image = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0))
    image = image.to(models.device, models.dtype)
    pipes = {
        name: stream_variant(models, size, levels, cfg_type="self", temporal=temporal)
        for name, temporal in TEMPORAL.items()
    }
    with torch.inference_mode():
        seconds = measure(pipes, image, rounds)
    bank = pipes["cache_2"].temporal_state.bank
    per_frame = bank.nbytes / max(len(bank), 1)
    return {
        **run_info(models, size, levels, rounds),
        "ms_per_frame": {k: round(1000 * v, 1) for k, v in seconds.items()},
        "cost_vs_off": {k: round(v / seconds["off"], 3) for k, v in seconds.items()},
        "cache_bytes_per_frame": int(per_frame),
    }


def bench_streams(spec: ModelSpec, size: int, rounds: int, counts: list[int]) -> dict:
    models = load_models(spec, progress=True)
    levels = (32, 45)
    image = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0))
    image = image.to(models.device, models.dtype)
    variants: dict[str, Callable[[torch.Tensor], object]] = {}
    for n in counts:
        for how in ("batched", "one_by_one"):
            pipes = []
            for i in range(n):
                config = StreamConfig(
                    width=size, height=size, t_index_list=levels, guidance_scale=1.4, seed=10 + i
                )
                pipe = StreamPipeline(models, config)
                pipe.set_prompt(f"{PROMPT}, variation {i}")
                pipes.append(pipe)
            if how == "batched":
                variants[f"{n}_{how}"] = lambda x, ps=pipes: drive_together([p.step(x) for p in ps])
            else:
                variants[f"{n}_{how}"] = lambda x, ps=pipes: [p(x) for p in ps]
    with torch.inference_mode():
        seconds = measure(variants, image, rounds)
    return {
        **run_info(models, size, levels, rounds),
        "aggregate_fps": {k: round(int(k.split("_")[0]) / v, 3) for k, v in seconds.items()},
        "per_stream_fps": {k: round(1 / v, 3) for k, v in seconds.items()},
        "batched_speedup": {
            n: round(seconds[f"{n}_one_by_one"] / seconds[f"{n}_batched"], 3) for n in counts
        },
    }


def bench_demo(path: Path, rounds: int, dtype: str | None) -> dict:
    """The demo of config ``path`` as configured (``dtype``: override the model's), each
    model preset as written and with ``temporal:`` off, round-robin on a moving pattern."""
    config = load_config(path)
    spec = config.model if dtype is None else dataclasses.replace(config.model, dtype=dtype)
    width, height = config.resolution
    if width != height:
        raise SystemExit(f"--demo measures square resolutions; {path} has {width}x{height}")
    warm = 8  # frames that prime Stream Batch and the temporal state, not timed
    frames = lavfi_frames(f"testsrc=size={width}x{width}:rate={config.fps:g}", warm + rounds, width)
    frames = (frames * 255 + 0.5).astype("uint8")
    models = load_bundle(spec, progress=True)
    engines: dict[str, Engine] = {}
    levels: dict[str, list[int]] = {}
    for file in sorted(config.presets_folder.glob("*.y*ml")):
        preset = dataclasses.replace(load_preset(file), ssf=SsfSettings(enabled=False))
        if preset.bypass:
            continue
        levels[preset.name] = list(preset.t_index_list)
        off = dataclasses.replace(preset, temporal=TemporalSettings())
        for variant, p in (("as configured", preset), ("temporal off", off)):
            engines[f"{preset.name}: {variant}"] = load_engine(
                spec, width, height, p, progress=False, models=models
            )
    times: dict[str, list[float]] = {name: [] for name in engines}
    for i, frame in enumerate(frames):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.process(frame, i / config.fps)
            if i >= warm:
                times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    return {
        **run_info(models, width, (), rounds),
        "config": str(path),
        "start_preset": config.presets.start,
        "levels": levels,
        "fps": {k: round(1 / v, 2) for k, v in seconds.items()},
        "configured_vs_off": {
            p: round(seconds[f"{p}: temporal off"] / seconds[f"{p}: as configured"], 3)
            for p in levels
        },
    }


def print_streams(result: dict) -> None:
    print(
        f"\n{result['model']}  {result['size']}  levels={result['levels']}  "
        f"{result['device']}/{result['dtype']}  threads={result['threads']}  "
        f"rounds={result['rounds']}  cfg self, Stream Batch"
    )
    for name, fps in result["aggregate_fps"].items():
        one = result["per_stream_fps"][name]
        print(f"  {name:<14} {fps:9.3f} fps aggregate  {one:8.3f} per stream")
    for n, ratio in result["batched_speedup"].items():
        print(f"  {n} streams: batched x{ratio:.3f} of one by one")


def print_demo(result: dict) -> None:
    print(
        f"\n{result['config']}: {result['model']}  {result['size']}  "
        f"{result['device']}/{result['dtype']}  threads={result['threads']}  "
        f"rounds={result['rounds']}  SSF off"
    )
    for name, fps in result["fps"].items():
        print(f"  {name:<36} {fps:7.2f} fps")
    for preset, ratio in result["configured_vs_off"].items():
        print(f"  {preset}: as configured x{ratio:.3f} of temporal off's speed")


def print_temporal(result: dict) -> None:
    print(
        f"\n{result['model']}  {result['size']}  levels={result['levels']}  "
        f"{result['device']}/{result['dtype']}  threads={result['threads']}  "
        f"rounds={result['rounds']}  cfg self"
    )
    for name, ms in result["ms_per_frame"].items():
        print(f"  {name:<12} {ms:9.1f} ms/frame  x{result['cost_vs_off'][name]:.3f} of off")
    mib = result["cache_bytes_per_frame"] / 2**20
    print(f"  attention cache: {mib:.2f} MiB per cached frame (all layers, {result['levels']})")


def print_table(result: dict) -> None:
    print(
        f"\n{result['model']}  {result['size']}  levels={result['levels']}  "
        f"{result['device']}/{result['dtype']}  threads={result['threads']}  "
        f"rounds={result['rounds']}"
    )
    for name, value in result["fps"].items():
        print(f"  {name:<20} {value:9.3f} fps")
    for key in (
        "stream_batch_speedup",
        "rcfg_self_speedup",
        "rcfg_initialize_speedup",
        "vs_diffusers_speedup",
        "floor_ratio",
    ):
        print(f"  {key:<24} {result[key]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["tiny:128", "sd-turbo-arch:256"],
        help="MODEL[:SIZE] entries (default: tiny:128 sd-turbo-arch:256)",
    )
    parser.add_argument("--size", type=int, help="override every model's size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--taesd", help='tiny autoencoder for every model (e.g. "tiny")')
    parser.add_argument(
        "--dtype",
        help="model.dtype (default float32, as docs/benchmarks.md's figures; auto may pick "
        "bfloat16; with --demo the config's own)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    parser.add_argument("--temporal", action="store_true", help="temporal techniques vs off")
    parser.add_argument("--streams", type=int, nargs="+", help="stream counts, batched vs not")
    parser.add_argument(
        "--demo", type=Path, metavar="CONFIG", help="a daemon config's presets as configured"
    )
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # custom-timestep notices from the diffusers side
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.demo:
        result = bench_demo(args.demo, args.rounds, args.dtype)
        print(json.dumps(result) if args.json else "", flush=True)
        print_demo(result)
        return
    for entry in args.models:
        model, _, size = entry.partition(":")
        spec = ModelSpec(
            id=model, taesd=args.taesd, device=args.device, dtype=args.dtype or "float32"
        )
        shape = (spec, args.size or int(size or 512), args.rounds)
        if args.streams:
            result, show = bench_streams(*shape, args.streams), print_streams
        elif args.temporal:
            result, show = bench_temporal(*shape), print_temporal
        else:
            result, show = bench_model(*shape), print_table
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            show(result)


if __name__ == "__main__":
    main()
