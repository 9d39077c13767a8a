"""Temporal consistency (issue 13): off is today's pipeline, each technique does what its
formula says, and the reset rules leave no trace of an old scene."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from broadcast_filter.control.config import ConfigError
from broadcast_filter.control.presets import Preset, SsfSettings, load_preset, with_param
from broadcast_filter.diffusion.batch import drive
from broadcast_filter.diffusion.stream import StreamConfig, StreamPipeline
from broadcast_filter.diffusion.temporal import (
    FEEDBACK_RAMP,
    BankAttnProcessor,
    FeatureBank,
    estimate_flow,
    install_bank_processors,
    luma,
    warp,
)
from broadcast_filter.diffusion.temporal_settings import TemporalSettings
from broadcast_filter.runtime.engine import Engine, stream_config

SIZE = 64
ATOL = 1e-5  # fp32 on CPU: batching changes only summation order
ALL_ON = TemporalSettings(feedback=0.3, flow_blend=0.5, cache_frames=2)
TECHNIQUES = {
    "feedback": TemporalSettings(feedback=0.3),
    "flow": TemporalSettings(flow_blend=0.5),
    "cache": TemporalSettings(cache_frames=2),
    "all": ALL_ON,
}


def scene(seed: int, count: int, step: int = 1) -> list[torch.Tensor]:
    """A smooth random picture panned ``step`` px per frame: (1, 3, SIZE, SIZE) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    big = F.interpolate(torch.rand((1, 3, 12, 12), generator=g), size=(96, 96), mode="bicubic")
    big = big.clamp(0, 1)
    return [
        big[..., 8 : 8 + SIZE, 8 + step * i : 8 + step * i + SIZE].clone() for i in range(count)
    ]


def make(models, temporal: TemporalSettings | None = None, **kw) -> StreamPipeline:
    temporal = temporal or TemporalSettings()
    config = StreamConfig(
        **{"width": SIZE, "height": SIZE, "guidance_scale": 1.5, "temporal": temporal, **kw}
    )
    pipe = StreamPipeline(models, config)
    pipe.set_prompt("a watercolor portrait", "blurry, low quality")
    return pipe


@pytest.fixture(scope="module")
def own_models(model_cache):
    """A private copy of the tiny model, so installing processors touches no other test."""
    from broadcast_filter.diffusion.models import load_models
    from broadcast_filter.diffusion.spec import ModelSpec

    return load_models(
        ModelSpec(id="tiny", device="cpu", dtype="float32", cache_dir=model_cache), progress=False
    )


# --------------------------------------------------------------------------- off is today


@pytest.mark.parametrize("stream_batch", [True, False], ids=["batch", "sequential"])
@pytest.mark.parametrize("cfg_type", ["none", "self", "initialize", "full"])
def test_off_is_bit_identical_to_the_pipeline_without_temporal_settings(
    tiny_models, cfg_type, stream_batch
):
    """Off with non-default thresholds computes exactly what the plain pipeline computes
    (which tests/test_stream.py checks against the references), with no host read."""
    off = TemporalSettings(cut_threshold=0.9, cache_interval=3)
    kw = {"t_index_list": (20, 40), "cfg_type": cfg_type, "use_stream_batch": stream_batch}
    plain = StreamPipeline(
        tiny_models, StreamConfig(width=SIZE, height=SIZE, guidance_scale=1.5, **kw)
    )
    plain.set_prompt("a watercolor portrait", "blurry, low quality")
    ours = make(tiny_models, off, **kw)
    for x in scene(0, 4) + scene(1, 2):
        assert torch.equal(ours(x), plain(x))
    assert ours.temporal_state.frame == 0  # never looked at


def test_wrapped_attention_processors_without_a_bank_change_nothing(own_models):
    pipe = make(own_models, t_index_list=(20, 40))
    inputs = scene(2, 3)
    before = [pipe(x) for x in inputs]
    install_bank_processors(own_models.unet)
    assert all(isinstance(p, BankAttnProcessor) for p in own_models.unet.attn_processors.values())
    pipe.restart()
    assert all(torch.equal(pipe(x), b) for x, b in zip(inputs, before, strict=True))


# --------------------------------------------------------------------------- latent feedback


def test_latent_feedback_is_exactly_the_documented_blend(tiny_models):
    """z = (1 - s_k) * E(image) + s_k * z_prev, z_prev the previous frame's output latent,
    s_k = s * min(1, k / FEEDBACK_RAMP) on the k-th frame after a cut."""
    s = 0.3
    pipe = make(
        tiny_models,
        TemporalSettings(feedback=s),
        t_index_list=(30,),
        cfg_type="none",
        use_stream_batch=False,
    )
    inputs = scene(3, FEEDBACK_RAMP + 2)
    out = pipe(inputs[0])  # the first frame starts a scene: nothing to feed back
    for k, x in enumerate(inputs[1:], start=1):
        z_prev = pipe.temporal_state.prev_latent.clone()
        with torch.inference_mode():
            torch.testing.assert_close(drive(pipe._decode(z_prev)), out, atol=0, rtol=0)
            sch = pipe._schedule
            s_k = s * min(1.0, k / FEEDBACK_RAMP)
            z = (1 - s_k) * drive(pipe._encode(x)) + s_k * z_prev
            x_t = sch.a[:1] * z + sch.b[:1] * pipe._noise[:1]
            eps = tiny_models.unet(x_t, sch.timesteps[:1], pipe._embeds.cond).sample
            x0 = sch.c_out[:1] * (x_t - sch.b[:1] * eps) / sch.a[:1] + sch.c_skip[:1] * x_t
            expected = drive(pipe._decode(x0))
        out = pipe(x)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_feedback_with_stream_batch_feeds_the_previous_frames_first_level_estimate(tiny_models):
    """One chain of frames, not lag + 1 interleaved ones: what frame k is fed comes from
    frame k - 1 (its first-level clean-latent prediction), not from the output latent."""
    pipe = make(tiny_models, TemporalSettings(feedback=0.3), t_index_list=(20, 40))
    seen = []
    first_latents = pipe._first_latents

    def spy(image, feedback=None):
        seen.append(None if feedback is None else feedback[0].clone())
        return first_latents(image, feedback)

    pipe._first_latents = spy
    unet_inputs = []
    hook = tiny_models.unet.register_forward_pre_hook(
        lambda _m, args: unet_inputs.append(args[0].clone())
    )
    try:
        for x in scene(15, 4):
            pipe(x)
    finally:
        hook.remove()
    assert seen[0] is None and all(z is not None for z in seen[1:])
    sch = pipe._schedule
    # Call 3's batch: [frame 3 at level 0, frame 2 at level 1]; frame 2's level-1 input was
    # made from its level-0 prediction at call 2, which is what call 3 was fed.
    x_level1 = unet_inputs[-1][1:]
    expected = sch.a[1:2] * seen[3] + sch.b[1:2] * pipe._noise[1:2]
    torch.testing.assert_close(x_level1, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_each_technique_changes_the_output_and_keeps_it_moving(tiny_models, name):
    inputs = scene(4, 7, step=2)
    off = make(tiny_models, t_index_list=(20, 40))
    on = make(tiny_models, TECHNIQUES[name], t_index_list=(20, 40))
    plain, ours = [off(x) for x in inputs], [on(x) for x in inputs]
    # Lag 1: the first two outputs are frame 0 and nothing earlier exists to reuse.
    for k in range(2):
        torch.testing.assert_close(ours[k], plain[k], atol=ATOL, rtol=0)
    # (the untrained tiny model's attention is weak: the cache moves it by about 1e-4)
    assert (ours[-1] - plain[-1]).abs().max() > 5 * ATOL
    assert all(torch.isfinite(o).all() for o in ours)
    assert (ours[-1] - ours[-2]).abs().mean() > 1e-4, "frozen output"


# --------------------------------------------------------------------------- flow blend


def test_block_matching_finds_a_known_shift_and_warp_undoes_it():
    (frame,) = scene(5, 1)
    y = luma(frame)
    moved = torch.roll(y, shifts=(1, 3), dims=(2, 3))  # content moves 3 right, 1 down
    flow = estimate_flow(y, moved, scale=1)
    interior = (slice(None), slice(8, -8), slice(8, -8))
    assert (flow[:, 0][interior] == 3).float().mean() > 0.95
    assert (flow[:, 1][interior] == 1).float().mean() > 0.95
    warped, valid = warp(frame, flow)
    inside = valid[0, 0].bool()
    assert inside[8:-8, 8:-8].float().mean() > 0.95
    target = torch.roll(frame, shifts=(1, 3), dims=(2, 3))
    assert (warped - target).abs()[..., 8:-8, 8:-8].mean() < 2e-3  # a few ambiguous blocks


def test_flow_blend_on_a_still_scene_is_the_documented_recursive_blend(tiny_models):
    """Still input: zero motion everywhere, so out_k = (1 - a) * raw_k + a * out_(k-1)."""
    a = 0.4
    kw = {"t_index_list": (30,), "use_stream_batch": False}
    pipe = make(tiny_models, TemporalSettings(flow_blend=a), **kw)
    raw = make(tiny_models, **kw)
    (x,) = scene(6, 1)
    noisy = [
        (x + 0.002 * torch.randn(x.shape, generator=torch.Generator().manual_seed(i)))
        for i in range(4)
    ]
    previous = None
    for frame in noisy:
        out, r = pipe(frame), raw(frame)
        expected = r if previous is None else (1 - a) * r + a * previous
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        previous = out


# --------------------------------------------------------------------------- attention cache


def test_a_bank_holding_the_frames_own_features_gives_the_uncached_result(own_models):
    install_bank_processors(own_models.unet)
    unet = own_models.unet
    g = torch.Generator().manual_seed(7)
    x, other = torch.randn((2, 1, 4, 8, 8), generator=g)
    t = torch.tensor([500])
    hidden = torch.randn((1, 77, unet.config.cross_attention_dim), generator=g)
    with torch.inference_mode():
        plain = unet(x, t, hidden).sample
        bank = FeatureBank(frames=2, recording=True)
        first = unet(x, t, hidden, cross_attention_kwargs={"feature_bank": bank}).sample
        bank.commit()
        assert len(bank) == 1 and bank.nbytes > 0
        bank.recording = False
        cached = unet(x, t, hidden, cross_attention_kwargs={"feature_bank": bank}).sample
        other_plain = unet(other, t, hidden).sample
        other_cached = unet(other, t, hidden, cross_attention_kwargs={"feature_bank": bank}).sample
    assert torch.equal(first, plain)  # an empty bank: nothing extra to attend to
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    assert (other_cached - other_plain).abs().max() > 1e-3  # another frame's features count


def test_cache_holds_at_most_cache_frames_refreshed_every_interval(tiny_models):
    temporal = TemporalSettings(cache_frames=2, cache_interval=3, cut_threshold=0)
    pipe = make(tiny_models, temporal, t_index_list=(20, 40))
    sizes = []
    for x in scene(8, 9):
        pipe(x)
        sizes.append(len(pipe.temporal_state.bank))
    # lag 1: the batch is past the first frame from call 1; records at calls 1, 4, 7
    assert sizes == [0, 1, 1, 1, 2, 2, 2, 2, 2]


# --------------------------------------------------------------------------- reset rules


@pytest.mark.parametrize("name", list(TECHNIQUES))
@pytest.mark.parametrize("levels", [(20, 40), (30,)], ids=["lag1", "lag0"])
def test_after_a_hard_cut_the_first_new_output_equals_a_fresh_pipeline(tiny_models, name, levels):
    pipe = make(tiny_models, TECHNIQUES[name], t_index_list=levels)
    old, new = scene(9, 5), scene(10, 3)
    for x in old:
        pipe(x)
    state = pipe.temporal_state
    cuts = state.cuts
    outs = [pipe(new[0])]
    assert state.last_similarity < 0.5  # the correlation of the two scenes' frames
    outs += [pipe(x) for x in new[1:]]
    assert state.cuts == cuts + 1 and state.last_cut == len(old)
    fresh = make(tiny_models, t_index_list=levels)  # no temporal state, primed on the cut
    lag = pipe.latency_frames
    torch.testing.assert_close(outs[lag], fresh(new[0]), atol=ATOL, rtol=0)


def test_the_cache_is_empty_right_after_a_cut(tiny_models):
    pipe = make(tiny_models, ALL_ON, t_index_list=(20, 40))
    for x in scene(11, 4):
        pipe(x)
    state = pipe.temporal_state
    assert len(state.bank) == 2 and state.prev_latent is not None
    pipe(scene(12, 1)[0])
    assert len(state.bank) == 0  # cleared, and not refilled while old frames are in flight
    assert state.feedback_latent() is None  # the cut frame itself is not fed anything


@pytest.mark.parametrize("how", ["reset", "seed", "restart"])
def test_reset_seed_change_and_restart_forget_the_old_scene(tiny_models, how):
    levels = (20, 40)
    pipe = make(tiny_models, replace(ALL_ON, cut_threshold=0), t_index_list=levels)
    frames = scene(13, 8)
    for x in frames[:4]:
        pipe(x)
    seed = 2
    if how == "reset":
        pipe.reset()  # e.g. the source was lost and is back
    elif how == "seed":
        seed = 99
        pipe.update(seed=seed)
    else:
        pipe.restart()
    outs = [pipe(x) for x in frames[4:]]
    assert pipe.temporal_state.last_cut == 4
    fresh = make(tiny_models, t_index_list=levels, seed=seed)
    lag = 0 if how == "restart" else pipe.latency_frames  # a restart primes from the frame
    torch.testing.assert_close(outs[lag], fresh(frames[4]), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- presets, engine


def test_temporal_section_in_a_preset_file_and_its_checks(tmp_path):
    path = tmp_path / "look.yaml"
    path.write_text("prompt: a cat\ntemporal: {feedback: 0.15, flow_blend: 0.5}\n")
    preset = load_preset(path)
    assert preset.temporal == TemporalSettings(feedback=0.15, flow_blend=0.5)
    assert load_preset(_write(tmp_path, "prompt: a cat\n")).temporal == TemporalSettings()
    with pytest.raises(ConfigError, match="feedback"):
        load_preset(_write(tmp_path, "prompt: a cat\ntemporal: {feedback: 0.5}\n"))
    with pytest.raises(ConfigError, match="cache_frames"):
        load_preset(_write(tmp_path, "prompt: a cat\ntemporal: {cache_frames: 5}\n"))


def _write(folder, text: str):
    path = folder / "other.yaml"
    path.write_text(text)
    return path


def test_every_temporal_field_is_live_through_the_commands_layer():
    base = Preset("a", prompt="a cat")
    values = {
        "feedback": 0.2,
        "flow_blend": 0.4,
        "cache_frames": 3,
        "cache_interval": 2,
        "cut_threshold": 0.7,
    }
    preset = base
    for name, value in values.items():
        preset = with_param(preset, f"temporal.{name}", value)
    assert preset.temporal == TemporalSettings(**values)
    with pytest.raises(ValueError, match=r"temporal\.feedback"):
        with_param(base, "temporal.feedback", 0.9)
    with pytest.raises(ValueError, match="allowed"):
        with_param(base, "temporal.bogus", 1)


def test_engine_live_change_needs_no_rebuild_and_a_switch_resets(tiny_models):
    preset = Preset(
        "a", prompt="a cat", t_index_list=(20, 40), ssf=SsfSettings(enabled=False), transition=0
    )
    pipe = StreamPipeline(tiny_models, stream_config(preset, SIZE, SIZE))
    engine = Engine(pipe, preset)
    images = [(x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8) for x in scene(14, 10)]
    outs = [engine.process(images[0], 0.0)[0]]
    for k, name in enumerate(["feedback", "flow_blend", "cache_frames"], start=1):
        preset = with_param(preset, f"temporal.{name}", {"cache_frames": 2}.get(name, 0.3))
        engine.switch(preset, float(k))
        outs.append(engine.process(images[k], float(k))[0])
    assert engine.pipe is pipe
    assert pipe.config.temporal == TemporalSettings(feedback=0.3, flow_blend=0.3, cache_frames=2)
    state = pipe.temporal_state
    # A live change is no cut: only the first frame started a scene.
    assert state.cuts == 1
    for k in range(4, 7):
        outs.append(engine.process(images[k], float(k))[0])
    steps = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in itertools.pairwise(outs)]
    assert max(steps) < 3 * np.median(steps) + 2, "a glitch frame"
    assert len(state.bank) > 0
    engine.switch(replace(preset, name="b", prompt="a dog"), 10.0)  # another look: reset
    engine.process(images[7], 10.0)
    assert state.cuts == 2 and len(state.bank) == 0 and state.last_cut == state.frame - 1
    engine.reset()  # source lost / back
    engine.process(images[8], 11.0)
    assert state.cuts == 3
