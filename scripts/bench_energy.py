"""Energy saved by the Stochastic Similarity Filter: CPU-seconds per output second through
the daemon, SSF on vs off, on a static scene and on a moving one, side by side in one run.

Each measurement builds the daemon in-process exactly as ``broadcast-filter run`` does
(:func:`~broadcast_filter.runtime.build.build_daemon`: presets, model, a ``null`` sink, the
source), runs it, lets it settle for ``--warmup`` seconds after its first output frame, then
counts this process's CPU time (``time.process_time``: every thread) over ``--seconds`` and
divides it by the output seconds in that window (frames out / fps). Start-up (model load,
warm-up) is excluded. The sources and the sink used here run inside the process: there are
no child processes to add. Every variant runs once per round, the order rotating between
rounds, so drifts of a shared machine hit all alike; figures are medians over the rounds.

Scenes: ``static`` is a still picture (the first frame of FFmpeg's ``testsrc2``, written as
a lossless clip and looped), ``moving`` is ``testsrc2`` itself. SSF ``on`` is a preset with
the default :class:`~broadcast_filter.control.presets.SsfSettings` (threshold 0.98, at most
10 skips in a row), ``off`` the same preset with ``ssf.enabled: false``.

    python scripts/bench_energy.py                                  # tiny 128x128, ~1 min
    python scripts/bench_energy.py --models tiny demo sd-turbo-arch:128 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import av
import yaml

from broadcast_filter.control.config import load_config
from broadcast_filter.control.presets import SsfSettings
from broadcast_filter.quiet import quiet_third_party
from broadcast_filter.runtime.build import build_daemon
from broadcast_filter.runtime.telemetry import StatusLine

PROMPT = "an oil painting of a face, warm light"
SCENES = ("static", "moving")
SSF = {"on": SsfSettings(), "off": SsfSettings(enabled=False)}
FIRST_FRAME_TIMEOUT_S = 600.0


def write_still(path: Path, size: int, fps: float, seconds: float = 2.0) -> Path:
    """A lossless clip (FFV1) of one unchanging frame of ``testsrc2``."""
    with av.open(f"testsrc2=size={size}x{size}:rate={fps:g}", format="lavfi") as pattern:
        picture = next(pattern.decode(video=0)).to_ndarray(format="rgb24")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv444p"
        for _ in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def write_config(folder: Path, model: str, size: int, fps: float, source: str, dtype: str) -> Path:
    """A daemon config (``null`` sink) with one preset per SSF setting in ``folder``."""
    presets = folder / "presets"
    presets.mkdir(parents=True, exist_ok=True)
    for name, ssf in SSF.items():
        body = {"prompt": PROMPT, "ssf": dataclasses.asdict(ssf), "transition": 0}
        (presets / f"ssf_{name}.yaml").write_text(yaml.safe_dump(body))
    config = {
        "model": {"id": model, "taesd": model, "device": "cpu", "dtype": dtype},
        "resolution": [size, size],
        "fps": fps,
        "source": {"url": source},
        "sinks": ["null"],
        "presets": {"folder": "presets", "start": "ssf_on"},
    }
    path = folder / f"daemon-{Path(source).stem}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def measure(
    config_path: Path, ssf: str, warmup: float, seconds: float
) -> tuple[dict[str, float], str]:
    """One run of the daemon with preset ``ssf_<ssf>``: CPU per output second and more, and
    the line the load logged about the model's dtype."""
    config = load_config(config_path)
    log = io.StringIO()
    daemon = build_daemon(config, preset=f"ssf_{ssf}", status=StatusLine(log), progress=False)
    thread = threading.Thread(target=daemon.run, name="daemon", daemon=True)
    thread.start()
    t = daemon.telemetry
    try:
        deadline = time.monotonic() + FIRST_FRAME_TIMEOUT_S
        while t.frames_out == 0:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"no output frame from {config_path}:\n{log.getvalue()}")
            time.sleep(0.05)
        time.sleep(warmup)
        before = (time.process_time(), time.monotonic(), t.frames_out, t.frames_model, t.frames_in)
        skipped_before = t.frames_skipped
        time.sleep(seconds)
        after = (time.process_time(), time.monotonic(), t.frames_out, t.frames_model, t.frames_in)
        skipped = t.frames_skipped - skipped_before
    finally:
        daemon.request_stop("benchmark over")
        thread.join(30)
    cpu, wall, out, model, frames_in = (b - a for a, b in zip(before, after, strict=True))
    output_seconds = out / config.fps
    dtype = next((line for line in log.getvalue().splitlines() if "dtype" in line), "")
    return {
        "cpu_s_per_output_s": cpu / output_seconds,
        "cpu_percent_of_a_core": 100 * cpu / wall,
        "input_fps": frames_in / wall,
        "output_fps": out / wall,
        "model_fps": model / wall,
        "skip_ratio": skipped / (skipped + model) if skipped + model else 0.0,
    }, dtype


def bench_model(model: str, size: int, args: argparse.Namespace, folder: Path) -> dict[str, object]:
    """Every (scene, ssf) variant of one model, interleaved over ``args.rounds`` rounds."""
    still = write_still(folder / f"still-{size}.mkv", size, args.fps)
    sources = {"static": f"file:{still}?loop=1", "moving": "testsrc"}
    configs = {
        scene: write_config(folder / model / scene, model, size, args.fps, url, args.dtype)
        for scene, url in sources.items()
    }
    variants = [(scene, ssf) for scene in SCENES for ssf in SSF]
    runs: dict[tuple[str, str], list[dict[str, float]]] = {v: [] for v in variants}
    dtype = ""
    for r in range(args.rounds):
        for scene, ssf in variants[r % len(variants) :] + variants[: r % len(variants)]:
            figures, dtype = measure(configs[scene], ssf, args.warmup, args.seconds)
            runs[scene, ssf].append(figures)
    result: dict[str, object] = {"model": model, "size": size, "fps": args.fps, "dtype": dtype}
    for scene in SCENES:
        per = {ssf: runs[scene, ssf] for ssf in SSF}
        median = {
            ssf: {key: statistics.median(run[key] for run in per[ssf]) for key in per[ssf][0]}
            for ssf in SSF
        }
        rounds = [
            off["cpu_s_per_output_s"] / on["cpu_s_per_output_s"]
            for on, off in zip(per["on"], per["off"], strict=True)
        ]
        result[scene] = {
            **median,
            "ratio_off_over_on": median["off"]["cpu_s_per_output_s"]
            / median["on"]["cpu_s_per_output_s"],
            "ratio_per_round": rounds,
        }
    return result


def table(results: list[dict[str, object]]) -> str:
    lines = [
        "| model | size | scene | SSF | CPU s / output s | CPU % of a core | model fps "
        "| skip ratio | off / on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for scene in SCENES:
            s = r[scene]
            for ssf in SSF:
                m = s[ssf]
                ratio = f"{s['ratio_off_over_on']:.2f}x" if ssf == "on" else ""
                lines.append(
                    f"| {r['model']} | {r['size']} | {scene} | {ssf} "
                    f"| {m['cpu_s_per_output_s']:.3f} | {m['cpu_percent_of_a_core']:.0f} "
                    f"| {m['model_fps']:.1f} | {m['skip_ratio']:.2f} | {ratio} |"
                )
    return "\n".join(lines)


def parse_model(text: str) -> tuple[str, int | None]:
    name, _, size = text.partition(":")
    return name, int(size) if size else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["tiny"], help="offline models, NAME or NAME:SIZE"
    )
    parser.add_argument("--size", type=int, default=128, help="frame size for models without one")
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds after first output")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--dtype", default="auto", help="model.dtype for every run")
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    args = parser.parse_args()
    quiet_third_party()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-energy-") as tmp:
        for text in args.models:
            model, size = parse_model(text)
            results.append(bench_model(model, size or args.size, args, Path(tmp)))
    print(json.dumps(results, indent=2))
    if not args.json:
        print(table(results))


if __name__ == "__main__":
    main()
