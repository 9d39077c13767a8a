"""End-to-end speed of the engine on one device, every switch measured on its own, in one run.

Prints one JSON object per line (and a summary table on stderr):

- ``pipeline``: 1 and 2 steps x cfg none/self/full x Stream Batch on/off (base switches);
- ``switch``: one switch changed at a time from the base (attention, channels_last, full VAE
  instead of TAESD, dtype, torch.compile, CUDA graphs);
- ``temporal``: 2 steps, cfg self, with each temporal technique (issue 13) on its own and all
  together (compare with the ``pipeline`` variant 2step-self-batch);
- ``streams``: N = 1, 2, 4, 8, 16 streams (own prompts and seeds, 1 step, cfg self, TAESD)
  batched into one UNet call per round vs the same pipelines run one after another;
  ``fps`` counts every stream's frames (aggregate), ``per_stream_fps`` one stream's;
- ``floor``: the raw compute, VAE encode + one UNet batch + VAE decode in a bare loop;
- ``e2e``: the fastest 1-step variant with frame conversion (uint8 host frame in, uint8 host
  frame out through :class:`FrameTransfer`), with its added latency;
- ``reference``: the PyPI ``streamdiffusion`` 0.1.1 package on the same weights and settings,
  run in a child process on its own old stack (``--reference-path``; CUDA only: its
  ``__call__`` times itself with CUDA events).

Models are the offline ``*-arch`` models: real architectures with random weights; compute does
not depend on weight values. Each figure: ``--frames`` timed frames after ``--warmup`` frames;
``fps`` from the wall time of all frames (synchronising once), ``latency_ms`` the median of
per-frame times (synchronising each frame).

    python scripts/bench_gpu.py --device cuda --reference-path /tmp/sdref     # on a GPU
    python scripts/bench_gpu.py --device cpu --size 256 --frames 3 --warmup 1  # here
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from broadcast_filter.diffusion.accel import accelerate, warm_up
from broadcast_filter.diffusion.batch import drive_together
from broadcast_filter.diffusion.models import load_models
from broadcast_filter.diffusion.offline import ensure_offline_model
from broadcast_filter.diffusion.spec import Acceleration, ModelSpec
from broadcast_filter.diffusion.stream import StreamConfig, StreamPipeline
from broadcast_filter.diffusion.temporal_settings import TemporalSettings
from broadcast_filter.runtime.frames import FrameTransfer

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import floor_variant  # the same floor in both benchmarks

PROMPT, NEGATIVE = "an oil painting of a face, warm light", "blurry, low quality"
LEVELS = {1: (35,), 2: (32, 45)}
REFERENCE_SCRIPT = Path(__file__).with_name("reference_streamdiffusion.py")


@dataclass(frozen=True)
class Variant:
    group: str
    steps: int = 1
    cfg_type: str = "none"
    stream_batch: bool = True
    taesd: bool = True
    # None: the base dtype, float16 on cuda, float32 on cpu (not ``auto``, which may pick
    # bfloat16 on a CPU with native bf16 and make the base the same as the bfloat16 switch)
    dtype: str | None = None
    accel: Acceleration = field(default_factory=Acceleration)
    temporal: TemporalSettings = field(default_factory=TemporalSettings)

    @property
    def name(self) -> str:
        vae = "taesd" if self.taesd else "vae"
        batch = "batch" if self.stream_batch else "seq"
        t = self.temporal
        temporal = f"-fb{t.feedback}-flow{t.flow_blend}-cache{t.cache_frames}" if t.active else ""
        return (
            f"{self.steps}step-{self.cfg_type}-{batch}-{vae}-{self.dtype or 'base'}-"
            f"{self.accel.describe()}" + temporal
        )


def variants(device: str, compile_on_cpu: bool) -> Iterator[Variant]:
    for steps in (1, 2):
        for cfg in ("none", "self", "full"):
            for batch in (True, False) if steps > 1 else (True,):
                yield Variant("pipeline", steps, cfg, batch)
    for temporal in (
        TemporalSettings(feedback=0.15),
        TemporalSettings(flow_blend=0.5),
        TemporalSettings(cache_frames=2),
        TemporalSettings(feedback=0.15, flow_blend=0.5, cache_frames=2),
    ):
        yield Variant("temporal", 2, "self", temporal=temporal)
    yield Variant("switch", accel=Acceleration(attention="classic"))
    yield Variant("switch", accel=Acceleration(channels_last=True))
    yield Variant("switch", taesd=False)
    yield Variant("switch", dtype="float32" if device == "cuda" else "bfloat16")
    if device == "cuda":
        yield Variant("switch", dtype="bfloat16")
    if device == "cuda" or compile_on_cpu:
        yield Variant("switch", accel=Acceleration(compile=True))
    if device == "cuda":
        yield Variant("switch", accel=Acceleration(compile=True, cuda_graphs=True))
        yield Variant("switch", accel=Acceleration(channels_last=True, compile=True))


def timed(step: Callable[[], object], frames: int, sync: Callable[[], None]) -> dict[str, float]:
    sync()
    start = time.perf_counter()
    for _ in range(frames):
        step()
    sync()
    fps = frames / (time.perf_counter() - start)
    per_frame = []
    for _ in range(frames):
        t0 = time.perf_counter()
        step()
        sync()
        per_frame.append(time.perf_counter() - t0)
    return {"fps": round(fps, 2), "latency_ms": round(1000 * statistics.median(per_frame), 2)}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        self.folder = ensure_offline_model(args.model)

    def load(self, v: Variant):
        spec = ModelSpec(
            id=str(self.folder),
            taesd=str(self.folder / "taesd") if v.taesd else None,
            device=self.args.device,
            dtype=v.dtype or ("float16" if self.args.device == "cuda" else "float32"),
        )
        return accelerate(load_models(spec, progress=False), v.accel)

    def pipeline(self, models, v: Variant) -> StreamPipeline:
        size = self.args.size
        config = StreamConfig(
            width=size,
            height=size,
            t_index_list=LEVELS[v.steps],
            cfg_type=v.cfg_type,
            guidance_scale=1.4,
            use_stream_batch=v.stream_batch,
            temporal=v.temporal,
        )
        pipe = StreamPipeline(models, config)
        pipe.set_prompt(PROMPT, NEGATIVE)
        return pipe

    def image(self, models) -> torch.Tensor:
        size = self.args.size
        image = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0))
        return image.to(models.device, models.dtype)

    def run_variant(self, v: Variant) -> dict:
        models = self.load(v)
        pipe = self.pipeline(models, v)
        compile_s = warm_up(pipe, self.args.warmup, progress=False)
        image = self.image(models)
        result = timed(lambda: pipe(image), self.args.frames, self.sync)
        return {"group": v.group, "variant": v.name, "warmup_s": round(compile_s, 2), **result}

    def streams(self, n: int, batched: bool) -> dict:
        """``n`` streams on one model, each its own pipeline: one UNet call for all per
        round, or each stream's frame on its own."""
        v = Variant("streams", 1, "self")
        models = self.load(v)
        pipes = [self.pipeline(models, v) for _ in range(n)]
        for i, pipe in enumerate(pipes):
            pipe.set_prompt(f"{PROMPT}, variation {i}", NEGATIVE)
            pipe.update(seed=100 + i)
            warm_up(pipe, self.args.warmup, progress=False)
        image = self.image(models)
        if batched:
            result = timed(
                lambda: drive_together([p.step(image) for p in pipes]), self.args.frames, self.sync
            )
        else:
            result = timed(lambda: [p(image) for p in pipes], self.args.frames, self.sync)
        how = "batched" if batched else "one-by-one"
        per_stream = result["fps"]
        return {
            "group": "streams",
            "variant": f"{n}streams-{how}-{v.name}",
            "streams": n,
            "fps": round(per_stream * n, 2),
            "per_stream_fps": per_stream,
            "latency_ms": result["latency_ms"],
        }

    def floor(self, steps: int) -> dict:
        """VAE encode + one UNet call on the Stream Batch + VAE decode, nothing else."""
        models = self.load(Variant("floor"))
        step = floor_variant(models, self.args.size, LEVELS[steps])
        image = self.image(models)
        for _ in range(self.args.warmup):
            step(image)
        result = timed(lambda: step(image), self.args.frames, self.sync)
        return {"group": "floor", "variant": f"{steps}step-unet+taesd", **result}

    def end_to_end(self, v: Variant) -> dict:
        """Host uint8 frame -> model -> host uint8 frame, through FrameTransfer."""
        models = self.load(v)
        pipe = self.pipeline(models, v)
        transfer = FrameTransfer(self.args.size, self.args.size, models.device, models.dtype)
        frame = np.random.default_rng(0).integers(0, 256, (self.args.size,) * 2 + (3,), np.uint8)
        warm_up(pipe, self.args.warmup, progress=False)
        result = timed(
            lambda: transfer.download(pipe(transfer.upload(frame))), self.args.frames, self.sync
        )
        added = pipe.latency_frames * 1000 / result["fps"] + result["latency_ms"]
        return {"group": "e2e", "variant": v.name, **result, "added_latency_ms": round(added, 2)}

    def reference(self, v: Variant) -> dict:
        command = [
            sys.executable,
            str(REFERENCE_SCRIPT),
            "--folder", str(self.folder),
            "--size", str(self.args.size),
            "--t-index-list", *map(str, LEVELS[v.steps]),
            "--cfg-type", v.cfg_type,
            "--frames", str(self.args.frames),
            "--warmup", str(self.args.warmup),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": self.args.reference_path}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return {"group": "reference", "variant": v.name, "error": done.stderr[-2000:]}
        return {"group": "reference", "variant": v.name, **json.loads(done.stdout.splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="sd-turbo-arch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--reference-path", help="folder with streamdiffusion 0.1.1 and its old stack"
    )
    parser.add_argument(
        "--compile-on-cpu", action="store_true", help="also time torch.compile on CPU (slow)"
    )
    parser.add_argument("--only", help="run only variants whose name contains this text")
    parser.add_argument(
        "--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="stream counts"
    )
    args = parser.parse_args()
    bench = Bench(args)
    info = {
        "group": "info",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "size": args.size,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(info), flush=True)
    jobs: list[tuple[str, Callable[[], dict]]] = [
        (v.name, lambda v=v: bench.run_variant(v))
        for v in variants(args.device, args.compile_on_cpu)
    ]
    jobs += [
        (f"streams-{n}-{how}", lambda n=n, b=b: bench.streams(n, b))
        for n in args.streams
        for b, how in ((True, "batched"), (False, "one-by-one"))
    ]
    jobs += [(f"floor-{n}step", lambda n=n: bench.floor(n)) for n in (1, 2)]
    best = Acceleration(compile=True, cuda_graphs=True) if args.device == "cuda" else Acceleration()
    e2e = Variant("e2e", accel=best)
    jobs.append((f"e2e-{e2e.name}", lambda: bench.end_to_end(e2e)))
    if args.reference_path:
        for ref in (Variant("reference", 1, "none"), Variant("reference", 2, "self")):
            jobs.append((f"reference-{ref.name}", lambda ref=ref: bench.reference(ref)))
    for label, job in jobs:
        if args.only and args.only not in label:
            continue
        try:
            result = job()
        except Exception as error:  # one failing switch must not lose the others' numbers
            result = {"group": "error", "variant": label, "error": repr(error)[:500]}
        print(json.dumps(result), flush=True)
        print(
            f"{result['group']:<9} {result['variant']:<58} "
            f"{result.get('fps', '-'):>8} fps {result.get('latency_ms', '-'):>8} ms",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
