"""The shipped demo model draws what its prompts say (issue 11): held-out pictures come out
closer to their own style's filter than to any other's, keep their edges, the demo file is
styled and follows the input's motion, and a crossfade moves from one style to the other.

Distances are L1 (mean absolute difference on the 0..1 scale) between the output and each
style's filter applied to the input: it compares colour *and* layout, so an output that has
the right palette but lost the picture (or the reverse) is not called a match, which a
colour-histogram distance would do (a black frame has neon's histogram).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from broadcast_filter.control.config import load_config
from broadcast_filter.control.presets import Preset, SsfSettings, load_preset
from broadcast_filter.diffusion.demo_data import (
    HELD_OUT_SEED,
    KINDS,
    images_of_kind,
    procedural_images,
)
from broadcast_filter.diffusion.demo_styles import STYLES, edge_magnitude
from broadcast_filter.diffusion.models import ModelBundle, load_models
from broadcast_filter.diffusion.spec import ModelSpec
from broadcast_filter.diffusion.stream import StreamPipeline
from broadcast_filter.diffusion.temporal_settings import TemporalSettings
from broadcast_filter.runtime.engine import Engine, load_engine, stream_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "demo_presets"
SIZE = 128  # the demo's resolution, what the model was trained at
#: the demo presets' levels: one step (pencil sketch) and two steps (the others)
LEVELS = {1: (45,), 2: (42, 48)}
#: per style, mean over the held-out pictures (measured: 0.35-0.49; the neon and pencil
#: filters' own outputs reach only 0.37 and 0.36, their edges are lines beside the input's)
MIN_EDGE_CORRELATION = 0.3
#: issue 11: the autoencoder's reconstruction PSNR on held-out pictures, mean over the kinds
#: (measured 27.1 dB), and a floor for every kind (the lowest measured: mandelbrot 17.9 dB)
MIN_AUTOENCODER_PSNR, MIN_AUTOENCODER_PSNR_PER_KIND = 24.0, 15.0


def presets_by_style() -> dict[str, Preset]:
    """Style prompt -> its demo preset, SSF off (every frame runs the model)."""
    by_prompt = {p.prompt: p for p in map(load_preset, sorted(PRESETS.glob("*.yaml")))}
    return {s: dataclasses.replace(by_prompt[s], ssf=SsfSettings(enabled=False)) for s in STYLES}


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]


def to_image(tensor: torch.Tensor) -> np.ndarray:
    return tensor[0].permute(1, 2, 0).clamp(0, 1).numpy()


def l1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def edge_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the Sobel magnitudes (as scripts/bench_quality.py)."""
    return float(np.corrcoef(edge_magnitude(a).ravel(), edge_magnitude(b).ravel())[0, 1])


@pytest.fixture(scope="module")
def demo() -> ModelBundle:
    spec = ModelSpec(id="demo", taesd="demo", device="cpu", dtype="float32")  # as measured
    return load_models(spec, progress=False)


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    """Six pictures the model never saw (the held-out seed), of six different kinds."""
    return procedural_images(6, HELD_OUT_SEED + 21, SIZE)


def styled(models: ModelBundle, preset: Preset, image: np.ndarray, **config) -> np.ndarray:
    """The pipeline's output for a still ``image`` once the frames in flight are its own."""
    cfg = dataclasses.replace(stream_config(preset, SIZE, SIZE), **config)
    pipe = StreamPipeline(models, cfg)
    pipe.set_prompt(preset.prompt, preset.negative_prompt)
    x = to_tensor(image)
    for _ in range(pipe.latency_frames + 1):
        out = pipe(x)
    return to_image(out)


@pytest.mark.parametrize("stream_batch", [True, False], ids=["stream-batch", "sequential"])
@pytest.mark.parametrize("steps", [1, 2])
def test_every_style_is_closest_to_its_own_filter(demo, held_out, steps, stream_batch):
    presets = presets_by_style()
    names = list(STYLES)
    # confusion[s, t]: how often the output with prompt s is nearest to filter t
    confusion = np.zeros((len(names), len(names)), int)
    for i, style in enumerate(names):
        for image in held_out:
            out = styled(
                demo,
                presets[style],
                image,
                t_index_list=LEVELS[steps],
                use_stream_batch=stream_batch,
                temporal=TemporalSettings(),
            )
            distances = [l1(out, STYLES[t](image)) for t in names]
            confusion[i, int(np.argmin(distances))] += 1
    assert (np.diag(confusion) == len(held_out)).all(), f"rows/columns {names}:\n{confusion}"


def test_outputs_keep_the_structure_of_the_input(demo, held_out):
    presets = presets_by_style()
    for style, preset in presets.items():
        outs = [styled(demo, preset, image) for image in held_out]
        corr = np.mean([edge_correlation(o, x) for o, x in zip(outs, held_out, strict=True)])
        assert corr > MIN_EDGE_CORRELATION, (style, corr)


def test_autoencoder_reconstructs_held_out_pictures_of_every_kind(demo):
    """Eight held-out pictures of each kind (as ``scripts/bench_quality.py --autoencoder``)."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    psnr = {}
    for kind in KINDS:
        images = np.stack(images_of_kind(kind, 8, rng, SIZE)).astype(np.float32)
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        x = x * 2 - 1
        with torch.no_grad():
            y = demo.vae.decode(demo.vae.encode(x).latents).sample.clamp(-1, 1)
        mse = ((y - x) ** 2).mean(dim=(1, 2, 3))
        psnr[kind] = float((10 * torch.log10(4 / mse)).mean())  # peak-to-peak 2 on -1..1
    assert np.mean(list(psnr.values())) >= MIN_AUTOENCODER_PSNR, psnr
    assert min(psnr.values()) >= MIN_AUTOENCODER_PSNR_PER_KIND, psnr


def test_stream_batch_equals_sequential_and_no_frame_is_nan_grey_or_black(demo, held_out):
    preset = presets_by_style()["pop-art posterized"]  # cfg self, guidance 1.3
    config = {"t_index_list": LEVELS[2], "temporal": TemporalSettings()}
    base = stream_config(preset, SIZE, SIZE)
    batched = StreamPipeline(demo, dataclasses.replace(base, use_stream_batch=True, **config))
    sequential = StreamPipeline(demo, dataclasses.replace(base, use_stream_batch=False, **config))
    for pipe in (batched, sequential):
        pipe.set_prompt(preset.prompt, preset.negative_prompt)
    inputs = [to_tensor(np.roll(held_out[0], 4 * k, axis=1)) for k in range(4)]
    expected = [sequential(x) for x in inputs]
    for k, x in enumerate(inputs):
        out = batched(x)
        torch.testing.assert_close(out, expected[max(0, k - 1)], atol=1e-4, rtol=0)
        assert torch.isfinite(out).all()
        assert out.std() > 0.05 and out.mean() > 0.05, "grey or black frame"


# ------------------------------------------------------------------ the demo file


def phase_shift(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """``(dx, dy)``: how far ``b``'s content lies moved from ``a``'s (phase correlation of
    the Hann-windowed luma planes)."""
    window = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    fa = np.fft.fft2(a.astype(np.float32).mean(axis=-1) * window)
    fb = np.fft.fft2(b.astype(np.float32).mean(axis=-1) * window)
    cross = fb * np.conj(fa)
    peak = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    dy, dx = np.unravel_index(int(np.argmax(peak)), peak.shape)
    h, w = peak.shape
    return int((dx + w // 2) % w - w // 2), int((dy + h // 2) % h - h // 2)


PAN = (-3, 2)  # px per input frame: the picture slides left and down


def pan_frames(frames: int) -> list[np.ndarray]:
    """A textured held-out picture panned by :data:`PAN` per frame, ``(H, W, 3)`` uint8."""
    wide = procedural_images(8, HELD_OUT_SEED + 5, 3 * SIZE)[5]
    dx, dy = PAN
    corners = [(SIZE - dx * k, SIZE - dy * k) for k in range(frames)]  # window moves against PAN
    return [(wide[y : y + SIZE, x : x + SIZE] * 255 + 0.5).astype(np.uint8) for x, y in corners]


def near(shift: tuple[int, int], expected: tuple[int, int], pixels: int = 1) -> bool:
    return all(abs(a - b) <= pixels for a, b in zip(shift, expected, strict=True))


@pytest.mark.parametrize("name", [None, "sepia"], ids=["start-preset", "flow-blend"])
def test_demo_follows_the_input_motion(demo, name):
    """The demo as configured (its start preset, and a preset with the flow blend; SSF off so
    that every frame runs the model), offline frame by frame on a pan of known motion: each
    output is nearest (L1) to its style's filter of the input it came from (Stream Batch's
    latency frames earlier) among the inputs up to 3 frames before and after; an output that
    lagged or froze would be nearest to an earlier one. With the flow blend on, consecutive
    outputs are also moved by the input's shift (phase correlation; the start preset's fixed
    noise pattern, which does not move, is too strong in its edges-on-black output for that)."""
    config = load_config(ROOT / "configs" / "demo.yaml")
    preset = load_preset(config.presets_folder / f"{name or config.presets.start}.yaml")
    preset = dataclasses.replace(preset, ssf=SsfSettings(enabled=False))
    assert name is None or preset.temporal.flow_blend > 0
    engine = load_engine(
        config.model, config.width, config.height, preset, progress=False, models=demo
    )
    frames = pan_frames(24)
    assert [phase_shift(a, b) for a, b in itertools.pairwise(frames)] == [PAN] * 23
    outputs = [engine.process(frame, k / config.fps)[0] for k, frame in enumerate(frames)]
    lag = engine.pipe.latency_frames
    style = STYLES[preset.prompt]
    targets = [style(f.astype(np.float32) / 255) for f in frames]
    settled = range(lag + 2, len(frames))  # primed, and the blend has a previous output
    misses = []  # per output: nearest input - the input it came from
    for k in settled:
        near_inputs = [i for i in range(k - lag - 3, k - lag + 4) if 0 <= i < len(frames)]
        distances = [l1(outputs[k].astype(np.float32) / 255, targets[i]) for i in near_inputs]
        misses.append(near_inputs[int(np.argmin(distances))] - (k - lag))
    assert all(abs(m) <= 1 for m in misses) and misses.count(0) >= 0.8 * len(misses), misses
    if preset.temporal.flow_blend > 0:
        steps = [phase_shift(outputs[k - 1], outputs[k]) for k in settled]
        assert all(near(step, PAN) for step in steps), steps
    for out in outputs[lag:]:  # neither black nor constant, nor the input passed through
        assert 15 < out.mean() < 240 and out.std() > 15, (out.mean(), out.std())
        assert min(np.abs(out.astype(int) - f).mean() for f in frames) > 20


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    """``frames`` as a 15 fps mp4 (near-lossless H.264)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=15, options={"crf": "4"})
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv444p"
        for picture in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, "rgb24")))
        container.mux(stream.encode(None))


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.slow
def test_demo_file_is_styled(tmp_path):
    """``broadcast-filter run --config configs/demo.yaml`` on a pan writes a styled file. It
    runs in real time (a slow frame drops inputs, a fast one repeats an output): how the
    output follows the motion is asserted offline (``test_demo_follows_the_input_motion``)."""
    write_video(tmp_path / "pan.mp4", pan_frames(60))
    raw = decode(tmp_path / "pan.mp4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BROADCAST_FILTER_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "broadcast_filter.cli", "run"]
    command += ["--config", str(ROOT / "configs" / "demo.yaml"), "--source", "pan.mp4"]
    result = subprocess.run(
        [*command, "--frames", "30"], cwd=tmp_path, env=env, capture_output=True, timeout=180
    )
    assert result.returncode == 0, result.stderr.decode()
    out = decode(tmp_path / "demo.mp4")
    assert len(out) == 30
    for frame in out:  # neither black nor constant, nor the input passed through
        assert 15 < frame.mean() < 240 and frame.std() > 15, (frame.mean(), frame.std())
        assert min(np.abs(frame.astype(int) - r).mean() for r in raw) > 20


# ------------------------------------------------------------------ crossfades


def test_crossfade_moves_the_output_from_style_a_to_style_b(demo, held_out):
    presets = presets_by_style()
    a = presets["sepia photograph"]
    b = dataclasses.replace(presets["cool blue night"], transition=1.0)
    image = held_out[1]
    engine = Engine(StreamPipeline(demo, stream_config(a, SIZE, SIZE)), a)
    frame = (image * 255 + 0.5).astype(np.uint8)
    for k in range(3):
        engine.process(frame, -1.0 + 0.1 * k)
    engine.switch(b, 0.0)
    target_a, target_b = STYLES[a.prompt](image), STYLES[b.prompt](image)
    share = []  # d_A / (d_A + d_B): 0 at style A, 1 at style B
    for k in range(14):  # 0.0 .. 1.3 s: the fade and a little after
        out = engine.process(frame, 0.1 * k)[0].astype(np.float32) / 255
        d_a, d_b = l1(out, target_a), l1(out, target_b)
        share.append(d_a / (d_a + d_b))
    assert share[0] < 0.35 and share[-1] > 0.65, share
    assert all(later > earlier - 0.03 for earlier, later in itertools.pairwise(share)), share
