"""Time the reference implementation (PyPI ``streamdiffusion`` 0.1.1) on an offline model folder.

Runs on the reference's own old stack, not ours; ``bench_gpu.py`` starts it as a child with
``PYTHONPATH`` pointing at a folder made by:

    pip install --target /tmp/sdref --no-deps streamdiffusion==0.1.1 diffusers==0.24.0 \
        huggingface_hub==0.25.2 transformers==4.46.3 tokenizers==0.20.3

CUDA only: the reference's ``__call__`` times itself with CUDA events (checked here on the
CPU up to that call: the old stack loads our offline folders and runs encode, the Stream Batch
step and decode). transformers 4.46 does not map the text encoder's weight names written by
transformers 5, so its text encoder starts random: that changes prompt encoding, done once,
not the per-frame cost being measured. Prints one JSON line
with ``fps`` (wall time over all frames) and ``latency_ms`` (median per frame; the reference
synchronises the device at the end of every call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import diffusers
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline
from streamdiffusion import StreamDiffusion


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True, help="offline model folder (with taesd/)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--t-index-list", type=int, nargs="+", default=[35])
    parser.add_argument("--cfg-type", default="none")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    dtype = torch.float16
    pipe = StableDiffusionPipeline.from_pretrained(
        args.folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to("cuda")
    stream = StreamDiffusion(
        pipe,
        t_index_list=args.t_index_list,
        torch_dtype=dtype,
        width=args.size,
        height=args.size,
        cfg_type=args.cfg_type,
    )
    stream.vae = AutoencoderTiny.from_pretrained(f"{args.folder}/taesd").to("cuda", dtype)
    stream.prepare(
        "an oil painting of a face, warm light", "blurry, low quality", guidance_scale=1.4
    )
    image = torch.rand((1, 3, args.size, args.size), generator=torch.Generator().manual_seed(0))
    image = image.to("cuda", dtype)
    for _ in range(args.warmup):
        stream(image)
    start = time.perf_counter()
    per_frame = []
    for _ in range(args.frames):
        t0 = time.perf_counter()
        stream(image)
        per_frame.append(time.perf_counter() - t0)
    fps = args.frames / (time.perf_counter() - start)
    print(
        json.dumps(
            {
                "fps": round(fps, 2),
                "latency_ms": round(1000 * statistics.median(per_frame), 2),
                "reference": "streamdiffusion 0.1.1",
                "diffusers": diffusers.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
