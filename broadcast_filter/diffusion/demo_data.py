"""Procedural pictures the demo model is trained and tested on: FFmpeg lavfi sources and
numpy gradients, shapes, gratings and smooth noise (all reproducible from their seed).

Detail is kept at scales a 128x128 picture through a 1/4-resolution latent can hold: the
lavfi sources are drawn coarser than the output and enlarged with nearest-neighbour
(``testsrc2`` and ``mandelbrot`` at half size, ``life`` with 4 or 8 px cells, ``cellauto``
with 8 px cells); 1-2 px cells and ``testsrc2``'s text at full size are finer than that.

:func:`procedural_images` draws ``count`` images from ``seed``; the training script uses
:data:`TRAIN_SEED` and the tests and benchmarks :data:`HELD_OUT_SEED`, so held-out images
come from other lavfi seeds, other frames and other shapes. Images are ``float32`` arrays
``(H, W, 3)``, RGB in ``[0, 1]``. Needs the ``ffmpeg`` command line tool; no torch.
"""

from __future__ import annotations

import subprocess

import numpy as np

__all__ = [
    "HELD_OUT_SEED",
    "KINDS",
    "TRAIN_SEED",
    "images_of_kind",
    "lavfi_frames",
    "procedural_images",
]

TRAIN_SEED = 0
HELD_OUT_SEED = 1_000_003
KINDS = ("testsrc2", "mandelbrot", "life", "cellauto", "gradients", "shapes", "gratings", "noise")


def lavfi_frames(source: str, count: int, size: int, every: int = 1) -> np.ndarray:
    """``count`` frames of an FFmpeg lavfi source (every ``every``-th one), ``(N, H, W, 3)``."""
    command = [
        "ffmpeg", "-v", "error", "-f", "lavfi", "-i", source,
        "-vf", f"select='not(mod(n\\,{every}))',scale={size}:{size}:flags=neighbor",
        "-fps_mode", "passthrough", "-frames:v", str(count),
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-",
    ]  # fmt: skip
    raw = subprocess.run(command, capture_output=True, check=True).stdout
    frames = np.frombuffer(raw, np.uint8).reshape(-1, size, size, 3)
    if len(frames) != count:
        raise RuntimeError(f"lavfi source {source!r} gave {len(frames)} of {count} frames")
    return frames.astype(np.float32) / 255


def _lavfi_source(kind: str, rng: np.random.Generator, size: int) -> tuple[str, int]:
    """A lavfi source description drawn from ``rng`` and the frame step to read it with."""
    seed = int(rng.integers(1, 2**31 - 1))
    half = size // 2  # testsrc2 and mandelbrot are drawn at half size, shown 2x (nearest)
    if kind == "testsrc2":
        start = int(rng.integers(0, 10_000))
        return f"testsrc2=size={half}x{half}:rate=25,trim=start_frame={start}", 7
    if kind == "mandelbrot":
        x, y = rng.uniform(-1.6, 0.3), rng.uniform(-0.8, 0.8)
        return (
            f"mandelbrot=size={half}x{half}:rate=25:maxiter=256:start_x={x:.4f}:"
            f"start_y={y:.4f}:start_scale={rng.uniform(0.5, 3):.3f}:end_scale=0.05",
            5,
        )
    if kind == "life":
        cells = int(rng.choice([16, 32]))
        colour = f"#{int(rng.integers(0, 2**24)):06x}"
        return (
            f"life=size={cells}x{cells}:rate=25:seed={seed}:ratio={rng.uniform(0.2, 0.6):.2f}"
            f":mold=10:life_color={colour}:death_color=#101010:mold_color=#205030",
            3,
        )
    if kind == "cellauto":
        cells = 16
        rule = int(rng.choice([18, 30, 45, 73, 90, 105, 110, 150]))
        return f"cellauto=size={cells}x{cells}:rate=25:rule={rule}:random_seed={seed}", 4
    raise ValueError(f"unknown lavfi kind {kind!r}")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise: a ``cells x cells`` random grid bilinearly upsampled, ``(H, W, 3)``."""
    grid = rng.random((cells + 1, cells + 1, 3), dtype=np.float32)
    pos = np.linspace(0, cells, size, dtype=np.float32)
    i = np.minimum(pos.astype(int), cells - 1)
    f = (pos - i)[:, None]
    rows = grid[i] * (1 - f[..., None]) + grid[i + 1] * f[..., None]
    f = (pos - i)[None, :, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def _gradients(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear, radial, circular or spiral gradient through 2-7 random colours (what lavfi's
    ``gradients`` draws; made here because that source is not reproducible from its seed)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.2, 0.8, 2)
    angle = rng.uniform(0, 2 * np.pi)
    radius = np.hypot(xx - cx, yy - cy)
    around = (np.arctan2(yy - cy, xx - cx) + np.pi) / (2 * np.pi)
    shape = str(rng.choice(["linear", "radial", "circular", "spiral"]))
    field = {
        "linear": xx * np.cos(angle) + yy * np.sin(angle),
        "radial": radius * 1.5,
        "circular": around,
        "spiral": around + 2 * radius,
    }[shape]
    colours = rng.random((int(rng.integers(2, 8)), 3), dtype=np.float32)
    position = (field % 1.0) * len(colours)
    low = position.astype(int) % len(colours)
    weight = (position - np.floor(position))[..., None]
    return colours[low] * (1 - weight) + colours[(low + 1) % len(colours)] * weight


def _shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    """Filled circles and rectangles in random colours over a smooth background."""
    image = 0.3 + 0.4 * _smooth_noise(rng, size, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(2, 7))):
        colour = rng.random(3, dtype=np.float32)
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(size / 16, size / 3)
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        else:
            mask = (abs(xx - cx) < r) & (abs(yy - cy) < rng.uniform(size / 16, size / 3))
        image[mask] = colour
    return image


def _gratings(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two or three coloured sinusoidal gratings at random angles and frequencies."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((size, size, 3), np.float32)
    waves = int(rng.integers(2, 4))
    for _ in range(waves):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(1, 8), rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(
            2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase
        )
        image += wave[..., None] * rng.random(3, dtype=np.float32)
    return np.clip(image / waves * 1.5, 0, 1)


def images_of_kind(kind: str, count: int, rng: np.random.Generator, size: int) -> list[np.ndarray]:
    """``count`` images of one of :data:`KINDS`, drawn from ``rng``."""
    if kind == "shapes":
        return [_shapes(rng, size) for _ in range(count)]
    if kind == "gratings":
        return [_gratings(rng, size) for _ in range(count)]
    if kind == "noise":
        return [_smooth_noise(rng, size, int(rng.integers(3, 12))) for _ in range(count)]
    if kind == "gradients":
        return [_gradients(rng, size) for _ in range(count)]
    images: list[np.ndarray] = []
    for start in range(0, count, 8):  # a few sources per kind, several frames of each
        source, every = _lavfi_source(kind, rng, size)
        images += list(lavfi_frames(source, min(8, count - start), size, every))
    return images


def procedural_images(count: int, seed: int, size: int = 128) -> np.ndarray:
    """``count`` images, an even mix of :data:`KINDS`, drawn from ``seed``: ``(N, H, W, 3)``."""
    rng = np.random.default_rng(seed)
    per_kind = -(-count // len(KINDS))
    images = [im for kind in KINDS for im in images_of_kind(kind, per_kind, rng, size)]
    order = rng.permutation(len(images))[:count]
    return np.stack([images[i] for i in order]).astype(np.float32)
