"""Picture quality of the filter on the trained demo model: fidelity, structure, flicker.

    python scripts/bench_quality.py                       # table + JSON, contact sheet in docs/
    python scripts/bench_quality.py --frames 24 --json out.json --sheet sheet.png
    python scripts/bench_quality.py --temporal             # off vs each temporal technique
    python scripts/bench_quality.py --autoencoder          # only the autoencoder, per kind

Synthetic videos made here, each with exactly known motion:

- ``pan``: FFmpeg's ``testsrc2`` pattern panned 2 px per frame (motion known everywhere);
- ``shapes``: a textured square moving 3 px per frame over a static textured background;
- ``noise``: a static scene with fresh sensor-like noise (sigma 4/255) on every frame;
- ``cut``: a static scene, then a hard cut to another one half-way.

For every style (the preset in ``configs/demo_presets`` with its prompt) and video, with
the preset's own levels, Stream Batch on, SSF off:

- fidelity: PSNR and SSIM of each output to ``STYLES[style](input)`` of the input it came from;
- structure: Pearson correlation of the output's edge magnitude with the input's;
- temporal stability: warp error (mean absolute difference between an output and the
  previous output moved by the input's known motion, on pixels visible in both; 0..255),
  the plain consecutive-frame difference, and both on the input for reference. A frozen
  output has a perfect warp error, so read it beside fidelity.

- autoencoder: reconstruction PSNR on held-out procedural images, per kind.

With ``--temporal`` the same measurement runs once per variant of the presets' ``temporal:``
section (:data:`VARIANTS`: off, each technique alone, combinations) and a side-by-side table
gives, per video and averaged over the styles, warp error and fidelity (PSNR, SSIM) with
their change against off, the consecutive-frame difference (a frozen output has none) and,
on the cut video, the largest difference (0..255) between the first output after the cut
and off's output for that frame.

Numbers only; the tests (tests/test_demo_model.py) assert the thresholds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from broadcast_filter.control.presets import Preset, SsfSettings, load_preset
from broadcast_filter.diffusion.demo_data import (
    HELD_OUT_SEED,
    KINDS,
    images_of_kind,
    lavfi_frames,
    procedural_images,
)
from broadcast_filter.diffusion.demo_styles import STYLES, edge_magnitude
from broadcast_filter.diffusion.spec import ModelSpec
from broadcast_filter.diffusion.temporal_settings import TemporalSettings
from broadcast_filter.quiet import quiet_third_party

if TYPE_CHECKING:
    from broadcast_filter.runtime.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "demo_presets"
SIZE = 128
#: ``--temporal``: the variants measured side by side (name -> the presets' temporal section).
VARIANTS = {
    "off": TemporalSettings(),
    "feedback 0.15": TemporalSettings(feedback=0.15),
    "feedback 0.3": TemporalSettings(feedback=0.3),
    "flow 0.5": TemporalSettings(flow_blend=0.5),
    "flow 0.7": TemporalSettings(flow_blend=0.7),
    "flow 0.7 @64": TemporalSettings(flow_blend=0.7, flow_size=64),
    "cache 2": TemporalSettings(cache_frames=2),
    "fb 0.15 + flow 0.7": TemporalSettings(feedback=0.15, flow_blend=0.7),
    "all (0.15, 0.7, 2)": TemporalSettings(feedback=0.15, flow_blend=0.7, cache_frames=2),
}


@dataclasses.dataclass
class Video:
    """Frames ``(N, H, W, 3)`` float in [0, 1], and per frame the shift ``(dx, dy)`` of the
    content since the previous frame inside ``moving`` (a mask; ``None``: everywhere), or
    ``None`` for a frame that does not follow the previous one (a cut)."""

    name: str
    frames: np.ndarray
    shifts: list[tuple[int, int] | None]
    moving: list[np.ndarray | None]


def make_videos(count: int) -> list[Video]:
    big = procedural_images(6, HELD_OUT_SEED + 7, 2 * SIZE)
    pictures = procedural_images(6, HELD_OUT_SEED + 11, SIZE)
    rng = np.random.default_rng(5)
    pattern = lavfi_frames(f"testsrc2=size={2 * SIZE}x{2 * SIZE}:rate=25", 1, 2 * SIZE)[0]
    pan = np.stack([pattern[64:64 + SIZE, 2 * i:2 * i + SIZE] for i in range(count)])  # fmt: skip
    videos = [Video("pan", pan, [None] + [(-2, 0)] * (count - 1), [None] * count)]
    background, texture = pictures[1], big[2][:40, :40]
    frames, masks = [], []
    for i in range(count):
        frame = background.copy()
        x0 = 10 + 3 * i
        mask = np.zeros((SIZE, SIZE), bool)
        mask[40:80, x0:x0 + 40] = True  # fmt: skip
        frame[mask] = texture.reshape(-1, 3)[: mask.sum()]
        frames.append(frame)
        masks.append(mask)
    videos.append(Video("shapes", np.stack(frames), [None] + [(3, 0)] * (count - 1), masks))
    noisy = np.clip(pictures[3] + rng.normal(0, 4 / 255, (count, SIZE, SIZE, 3)), 0, 1)
    videos.append(
        Video("noise", noisy.astype(np.float32), [None] + [(0, 0)] * (count - 1), [None] * count)
    )
    half = count // 2
    cut = np.stack([pictures[4]] * half + [pictures[5]] * (count - half))
    shifts = [None] + [(0, 0)] * (half - 1) + [None] + [(0, 0)] * (count - half - 1)
    videos.append(Video("cut", cut, shifts, [None] * count))
    return videos


def shifted(image: np.ndarray, dx: int, dy: int) -> tuple[np.ndarray, np.ndarray]:
    """``image`` moved by ``(dx, dy)`` and the mask of pixels it covers."""
    out = np.zeros_like(image)
    valid = np.zeros(image.shape[:2], bool)
    h, w = image.shape[:2]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = image[ys, xs]
    valid[yd, xd] = True
    return out, valid


def warp_error(frames: np.ndarray, video: Video) -> float | None:
    """Mean |frame_t - motion(frame_t-1)| on pixels visible in both (0..255 scale)."""
    errors = []
    for t in range(1, len(frames)):
        shift = video.shifts[t]
        if shift is None:
            continue
        prev, cur = frames[t - 1].astype(np.float32), frames[t].astype(np.float32)
        if video.moving[t] is None:
            moved, valid = shifted(prev, *shift)
        else:  # the square moves, the background stays; both sides of its edges are occluded
            square, _ = shifted(prev, *shift)
            inside = shifted(video.moving[t - 1].astype(np.float32), *shift)[0] > 0.5
            still = ~(video.moving[t] | video.moving[t - 1])
            moved = np.where(inside[..., None], square, prev)
            valid = (inside & video.moving[t]) | still
        errors.append(np.abs(cur - moved)[valid].mean())
    return float(np.mean(errors)) if errors else None


def consecutive(frames: np.ndarray) -> float:
    f = frames.astype(np.float32)
    return float(np.abs(f[1:] - f[:-1]).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of the luma planes (7x7 uniform window, the usual constants)."""
    weights = torch.tensor([0.299, 0.587, 0.114])
    x = (torch.from_numpy(a.astype(np.float32)) @ weights)[None, None]
    y = (torch.from_numpy(b.astype(np.float32)) @ weights)[None, None]
    mean = lambda t: F.avg_pool2d(t, 7, 1)  # noqa: E731
    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def edge_correlation(a: np.ndarray, b: np.ndarray) -> float:
    ea = edge_magnitude(a.astype(np.float32) / 255).ravel()
    eb = edge_magnitude(b.astype(np.float32) / 255).ravel()
    return float(np.corrcoef(ea, eb)[0, 1])


def autoencoder_psnr(engine: Engine, per_kind: int = 8) -> dict[str, float]:
    """Reconstruction PSNR (dB, mean over images) of the model's autoencoder on held-out
    procedural images, per kind and overall."""
    vae = engine.pipe.models.vae  # an AutoencoderTiny (the model is loaded with its taesd)
    rng = np.random.default_rng(HELD_OUT_SEED)
    scores: dict[str, float] = {}
    for kind in KINDS:
        images = np.stack(images_of_kind(kind, per_kind, rng, SIZE)).astype(np.float32)
        x = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
        with torch.no_grad():
            y = vae.decode(vae.encode(x.to(vae.dtype)).latents).sample.float().clamp(-1, 1)
        mse = ((y - x) ** 2).mean(dim=(1, 2, 3))
        scores[kind] = float((10 * torch.log10(4 / mse)).mean())
    scores["all"] = float(np.mean(list(scores.values())))
    return scores


def run_style(engine: Engine, preset: Preset, frames: np.ndarray) -> np.ndarray:
    """The engine's outputs on ``preset``, each aligned with the input it came from (Stream
    Batch delays an input by ``latency_frames`` calls; a fresh stream primes itself)."""
    engine.switch(preset, 0.0)  # transition 0: applied at once
    engine.pipe.restart()
    delay = engine.pipe.latency_frames
    frames_u8 = (frames * 255 + 0.5).astype(np.uint8)
    outputs = [engine.process(f, float(i))[0] for i, f in enumerate(frames_u8)]
    tail = [frames_u8[-1]] * delay  # flush the frames in flight
    outputs += [engine.process(f, float(len(frames_u8) + i))[0] for i, f in enumerate(tail)]
    return np.stack(outputs[delay:])


def measure(
    engine: Engine, presets: dict[str, Preset], videos: list[Video], keep: dict | None = None
) -> dict:
    """The figures per style and video; ``keep`` (if given) receives the outputs."""
    results: dict = {"inputs": {}, "styles": {}}
    for video in videos:
        frames_u8 = (video.frames * 255 + 0.5).astype(np.uint8)
        results["inputs"][video.name] = {
            "warp_error": warp_error(frames_u8, video),
            "consecutive_diff": consecutive(frames_u8),
        }
    for style, preset in presets.items():
        per_video = {}
        for video in videos:
            out = run_style(engine, preset, video.frames)
            if keep is not None:
                keep[(style, video.name)] = out
            inputs = (video.frames * 255 + 0.5).astype(np.uint8)
            targets = [(STYLES[style](f) * 255 + 0.5).astype(np.uint8) for f in video.frames]
            per_video[video.name] = {
                "psnr": float(np.mean([psnr(o, t) for o, t in zip(out, targets, strict=True)])),
                "ssim": float(np.mean([ssim(o, t) for o, t in zip(out, targets, strict=True)])),
                "edge_corr": float(
                    np.mean([edge_correlation(o, i) for o, i in zip(out, inputs, strict=True)])
                ),
                "warp_error": warp_error(out, video),
                "consecutive_diff": consecutive(out),
                "mean": float(out.mean()),
                "std": float(out.std()),
            }
        results["styles"][style] = per_video
    return results


def contact_sheet(
    engine: Engine, presets: dict[str, Preset], video: Video, path: Path, rows: int = 4
) -> None:
    """Input then each style (columns) for a few frames of ``video`` (rows), labelled."""
    picks = np.linspace(0, len(video.frames) - 1, rows).astype(int)
    columns = [("input", (video.frames * 255 + 0.5).astype(np.uint8))]
    columns += [(s, run_style(engine, p, video.frames)) for s, p in presets.items()]
    pad, label = 4, 14
    width = len(columns) * (SIZE + pad) + pad
    height = label + rows * (SIZE + pad) + pad
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for c, (name, frames) in enumerate(columns):
        x = pad + c * (SIZE + pad)
        draw.text((x, 2), name.replace("_", " "), fill=(230, 230, 230))
        for r, index in enumerate(picks):
            sheet.paste(Image.fromarray(frames[index]), (x, label + pad + r * (SIZE + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def print_table(results: dict) -> None:
    ae = results["autoencoder_psnr_db"]
    print("autoencoder PSNR (dB): " + ", ".join(f"{k} {v:.1f}" for k, v in ae.items()))
    head = (
        f"{'style':<20} {'video':<7} {'PSNR':>6} {'SSIM':>6} {'edges':>6} {'warp':>6} {'diff':>6}"
    )
    print(head)
    for video, ref in results["inputs"].items():
        warp = "-" if ref["warp_error"] is None else f"{ref['warp_error']:.2f}"
        blank = f"{'':>6} {'':>6} {'':>6}"
        print(f"{'(input)':<20} {video:<7} {blank} {warp:>6} {ref['consecutive_diff']:>6.2f}")
    for style, videos in results["styles"].items():
        for video, m in videos.items():
            warp = "-" if m["warp_error"] is None else f"{m['warp_error']:.2f}"
            print(
                f"{style:<20} {video:<7} {m['psnr']:>6.2f} {m['ssim']:>6.3f} "
                f"{m['edge_corr']:>6.3f} {warp:>6} {m['consecutive_diff']:>6.2f}"
            )


def measure_temporal(
    engine: Engine, presets: dict[str, Preset], videos: list[Video], variants: list[str]
) -> dict:
    """:func:`measure` per entry of :data:`VARIANTS` named in ``variants`` (and off),
    averaged over the styles, with the cut trace: max |first output after the cut - off's
    output for that frame| (0..255)."""
    cut = next(v for v in videos if v.name == "cut")
    first_new = next(i for i, s in enumerate(cut.shifts) if s is None and i > 0)
    table: dict = {}
    off_outputs: dict = {}
    for name in ["off", *(v for v in variants if v != "off")]:
        temporal = VARIANTS[name]
        variant = {s: dataclasses.replace(p, temporal=temporal) for s, p in presets.items()}
        outputs: dict = {}
        started = time.perf_counter()
        per_style = measure(engine, variant, videos, keep=outputs)["styles"]
        if name == "off":
            off_outputs = outputs
        rows = {}
        for video in videos:
            ms = [per_style[s][video.name] for s in presets]
            row = {k: float(np.mean([m[k] for m in ms])) for k in ("psnr", "ssim", "edge_corr")}
            warps = [m["warp_error"] for m in ms if m["warp_error"] is not None]
            row["warp_error"] = float(np.mean(warps)) if warps else None
            row["consecutive_diff"] = float(np.mean([m["consecutive_diff"] for m in ms]))
            if video.name == "cut":
                row["cut_trace"] = max(
                    float(
                        np.abs(
                            outputs[(s, "cut")][first_new].astype(np.float32)
                            - off_outputs[(s, "cut")][first_new].astype(np.float32)
                        ).max()
                    )
                    for s in presets
                )
            rows[video.name] = row
        table[name] = {
            "temporal": dataclasses.asdict(temporal),
            "videos": rows,
            "per_style": per_style,
            "seconds": round(time.perf_counter() - started, 1),
        }
    return table


def print_temporal(table: dict) -> None:
    off = table["off"]["videos"]
    print(
        f"{'variant':<20} {'video':<7} {'warp':>6} {'dwarp':>7} {'PSNR':>6} {'dPSNR':>7} "
        f"{'SSIM':>6} {'dSSIM':>7} {'edges':>6} {'diff':>6} {'cut':>5}"
    )

    def change(value: float | None, base: float | None) -> str:
        if value is None or not base:
            return "-"
        return f"{100 * (value - base) / base:+.0f}%"

    for name, entry in table.items():
        for video, m in entry["videos"].items():
            base = off[video]
            warp = "-" if m["warp_error"] is None else f"{m['warp_error']:.2f}"
            trace = f"{m['cut_trace']:.1f}" if "cut_trace" in m else ""
            print(
                f"{name:<20} {video:<7} {warp:>6} {change(m['warp_error'], base['warp_error']):>7} "
                f"{m['psnr']:>6.2f} {change(m['psnr'], base['psnr']):>7} {m['ssim']:>6.3f} "
                f"{change(m['ssim'], base['ssim']):>7} {m['edge_corr']:>6.3f} "
                f"{m['consecutive_diff']:>6.2f} {trace:>5}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo", help="model id (default: the shipped demo)")
    parser.add_argument("--frames", type=int, default=24, help="frames per video")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="model.dtype (the demo's: float32)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--temporal", action="store_true", help="off vs each temporal technique, side by side"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        metavar="NAME",
        help="with --temporal: these variants only (off is always measured)",
    )
    parser.add_argument(
        "--autoencoder", action="store_true", help="only the autoencoder's PSNR per kind"
    )
    parser.add_argument(
        "--sheet", type=Path, default=ROOT / "docs" / "demo_contact_sheet.png", help="PNG path"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_third_party()  # before diffusers is imported
    from broadcast_filter.runtime.engine import load_engine

    started = time.perf_counter()
    spec = ModelSpec(id=args.model, taesd=args.model, device="cpu", dtype=args.dtype)
    by_prompt = {p.prompt: p for p in map(load_preset, sorted(PRESETS.glob("*.yaml")))}
    presets = {  # style prompt -> its preset, SSF off and no crossfade
        style: dataclasses.replace(by_prompt[style], ssf=SsfSettings(enabled=False), transition=0)
        for style in STYLES
    }
    engine = load_engine(spec, SIZE, SIZE, next(iter(presets.values())), progress=False)
    if args.autoencoder:
        scores = autoencoder_psnr(engine)
        print(f"autoencoder PSNR on held-out pictures ({args.model}, {engine.pipe.dtype}):")
        print("\n".join(f"  {kind:<10} {db:5.1f} dB" for kind, db in scores.items()))
        return 0
    videos = make_videos(args.frames)
    if args.temporal:
        results = {"temporal": measure_temporal(engine, presets, videos, args.variants)}
        results["seconds"] = round(time.perf_counter() - started, 1)
        results["command"] = "python scripts/bench_quality.py " + " ".join(argv or sys.argv[1:])
        print_temporal(results["temporal"])
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        return 0
    results = measure(engine, presets, videos)
    results["autoencoder_psnr_db"] = autoencoder_psnr(engine)
    contact_sheet(engine, presets, videos[0], args.sheet)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["command"] = "python scripts/bench_quality.py " + " ".join(argv or sys.argv[1:])
    print_table(results)
    print(json.dumps(results, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"contact sheet: {args.sheet}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
