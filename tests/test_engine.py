"""The engine: crossfades handed to the pipeline, SSF skips, level changes, no per-frame leaks."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch

from broadcast_filter.control.presets import Preset, SsfSettings
from broadcast_filter.control.transitions import crossfade_weight, lerp
from broadcast_filter.diffusion.stream import StreamPipeline
from broadcast_filter.runtime.engine import Engine, stream_config

SIZE = 64


class RecordingPipe:
    """The real pipeline, with the conditioning and outputs it is handed recorded."""

    def __init__(self, pipe: StreamPipeline) -> None:
        self.pipe = pipe
        self.embeds: list = []
        self.outputs: list[torch.Tensor] = []

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)

    def set_prompt_embeds(self, embeds) -> None:
        self.embeds.append(embeds)
        self.pipe.set_prompt_embeds(embeds)

    def step(self, image: torch.Tensor):
        out = yield from self.pipe.step(image)
        self.outputs.append(out.clone())
        return out


STYLE_A = Preset(
    "a",
    prompt="a watercolor city",
    guidance_scale=1.2,
    cfg_type="self",
    t_index_list=(32, 45),
    ssf=SsfSettings(enabled=False),
    transition=1.0,
)
STYLE_B = Preset(
    "b",
    prompt="a neon cyberpunk street",
    negative_prompt="blurry",
    guidance_scale=2.0,
    delta=0.5,
    cfg_type="self",
    t_index_list=(30, 40),
    seed=9,
    ssf=SsfSettings(enabled=False),
    transition=1.0,
)


def moving_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(count)]


@pytest.fixture
def recording_engine(tiny_models_taesd):
    pipe = RecordingPipe(StreamPipeline(tiny_models_taesd, stream_config(STYLE_A, SIZE, SIZE)))
    return Engine(pipe, STYLE_A), pipe


def test_crossfade_hands_the_pipeline_the_documented_interpolation(recording_engine):
    engine, pipe = recording_engine
    a = pipe.encode_prompt(STYLE_A.prompt, STYLE_A.negative_prompt)
    b = pipe.encode_prompt(STYLE_B.prompt, STYLE_B.negative_prompt)
    times = [0.0, 0.5, 10.0, 10.25, 10.5, 10.75, 11.0, 11.5]
    frames = moving_frames(len(times))
    outputs = []
    for i, (now, image) in enumerate(zip(times, frames, strict=True)):
        if now == 10.0:
            engine.switch(STYLE_B, now)
            # discrete fields change when the switch starts
            assert pipe.config.t_index_list == (30, 40) and pipe.config.seed == 9
        out, skipped = engine.process(image, now)
        outputs.append(out)
        assert not skipped
        w = crossfade_weight(10.0, 1.0, now) if now >= 10.0 else 0.0
        expected = b if w == 1.0 else a.lerp(b, w) if w else a
        handed = pipe.embeds[-1]
        assert torch.allclose(handed.cond, expected.cond, atol=1e-6), (i, w)
        assert torch.allclose(handed.uncond, expected.uncond, atol=1e-6), (i, w)
        assert pipe.config.guidance_scale == pytest.approx(lerp(1.2, 2.0, w))
        assert pipe.config.delta == pytest.approx(lerp(1.0, 0.5, w))
    # every frame came out: finite, not constant, of the right size
    assert len(pipe.outputs) == len(frames) == len(outputs)
    for out in pipe.outputs:
        assert torch.isfinite(out).all() and out.std() > 0
    assert all(o.shape == (SIZE, SIZE, 3) and o.dtype == np.uint8 for o in outputs)
    assert not engine.fading  # finished at w = 1


def test_a_switch_mid_crossfade_starts_from_the_blend_on_screen(recording_engine):
    engine, pipe = recording_engine
    a = pipe.encode_prompt(STYLE_A.prompt, STYLE_A.negative_prompt)
    b = pipe.encode_prompt(STYLE_B.prompt, STYLE_B.negative_prompt)
    engine.switch(STYLE_B, 0.0)
    engine.process(moving_frames(1)[0], 0.5)
    halfway = a.lerp(b, 0.5)
    engine.switch(STYLE_A, 0.5)  # back to A before B is reached: no jump
    engine.process(moving_frames(2)[1], 1.0)
    expected = halfway.lerp(a, 0.5)
    assert torch.allclose(pipe.embeds[-1].cond, expected.cond, atol=1e-6)
    assert pipe.config.guidance_scale == pytest.approx(lerp(1.6, 1.2, 0.5))


def test_similarity_filter_skips_static_frames_by_reemitting_the_last_output(tiny_models_taesd):
    preset = replace(STYLE_A, ssf=SsfSettings(enabled=True, threshold=0.9, max_skip=3))
    pipe = RecordingPipe(StreamPipeline(tiny_models_taesd, stream_config(preset, SIZE, SIZE)))
    engine = Engine(pipe, preset)
    still = moving_frames(1)[0]
    results = [engine.process(still, float(i)) for i in range(9)]
    skipped = [s for _, s in results]
    # identical frames: every frame after the first skips, at most 3 in a row
    assert skipped == [False, True, True, True, False, True, True, True, False]
    assert len(pipe.outputs) == 3
    first = results[0][0]
    assert all(out is first for out, s in results[1:4])


def test_similarity_filter_never_skips_during_a_crossfade(tiny_models_taesd):
    preset = replace(STYLE_A, ssf=SsfSettings(enabled=True, threshold=0.5, max_skip=10))
    engine = Engine(StreamPipeline(tiny_models_taesd, stream_config(preset, SIZE, SIZE)), preset)
    still = moving_frames(1)[0]
    engine.process(still, 0.0)
    engine.switch(replace(STYLE_B, ssf=preset.ssf), 1.0)
    assert [engine.process(still, t)[1] for t in (1.1, 1.5, 1.9)] == [False, False, False]
    assert engine.process(still, 2.5)[1] is False  # first frame after: the new reference
    assert engine.process(still, 2.6)[1] is True


def test_switching_to_a_preset_with_fewer_levels_never_emits_a_flat_frame(recording_engine):
    engine, pipe = recording_engine
    one_step = replace(STYLE_B, t_index_list=(35,), transition=0.5)
    frames = moving_frames(6)
    engine.process(frames[0], 0.0)
    engine.switch(one_step, 1.0)
    for i, image in enumerate(frames[1:], start=1):
        engine.process(image, 1.0 + 0.2 * i)
    assert pipe.config.t_index_list == (35,)
    assert len(pipe.outputs) == 6
    for out in pipe.outputs:
        assert torch.isfinite(out).all() and out.std() > 0


def live_tensors() -> int:
    return sum(type(o) is torch.Tensor for o in gc.get_objects())


def test_the_engine_keeps_nothing_per_frame(tiny_models_taesd):
    engine = Engine(StreamPipeline(tiny_models_taesd, stream_config(STYLE_A, SIZE, SIZE)), STYLE_A)
    frames = moving_frames(8)
    for i in range(10):
        engine.process(frames[i % 8], float(i))
    gc.collect()
    tensors = live_tensors()
    outputs = []
    for i in range(10, 70):
        out, _ = engine.process(frames[i % 8], float(i))
        outputs.append(weakref.ref(out))
        del out
    gc.collect()
    assert sum(ref() is not None for ref in outputs) == 1  # only the last (for SSF re-emits)
    assert live_tensors() == tensors


def test_lag_says_which_frame_the_output_shows_with_stream_batch():
    """Two levels with Stream Batch: the first call primes (its output is its own frame),
    after that each output is the frame that entered one call earlier; checked on the demo
    model (it draws what it is given) against engines that only ever saw one frame, and lag
    is 0 again after a restart."""
    from broadcast_filter.diffusion.demo_data import HELD_OUT_SEED, procedural_images
    from broadcast_filter.diffusion.models import load_models
    from broadcast_filter.diffusion.spec import ModelSpec

    models = load_models(
        ModelSpec(id="demo", taesd="demo", device="cpu", dtype="float32"), progress=False
    )
    preset = replace(STYLE_A, prompt="sepia photograph", cfg_type="none", t_index_list=(42, 48))
    pictures = procedural_images(3, HELD_OUT_SEED + 5, 128)
    a, b, c = (np.ascontiguousarray(p * 255).astype(np.uint8) for p in pictures)

    def engine() -> Engine:
        return Engine(StreamPipeline(models, stream_config(preset, 128, 128)), preset)

    def alone(frame: np.ndarray) -> np.ndarray:  # an engine that only ever saw `frame`
        only = engine()
        for _ in range(3):
            out, _ = only.process(frame, 0.0)
        return out.astype(np.float64)

    e = engine()
    lags, outs = [], []
    for frame in (a, b, c):
        out, skipped = e.process(frame, 0.0)
        assert not skipped
        lags.append(e.lag)
        outs.append(out.astype(np.float64))
    assert lags == [0, 1, 1]
    like_b, like_c = (np.abs(outs[2] - alone(x)).mean() for x in (b, c))
    print(f"\nthird output vs b alone {like_b:.2f}, vs c alone {like_c:.2f}")
    assert like_b < like_c / 2  # the third call's output shows b, the frame before c
    e.pipe.restart()
    e.process(a, 0.0)
    assert e.lag == 0
