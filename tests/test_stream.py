"""The stream pipeline against independent references: diffusers' LCMScheduler and img2img
pipeline, the textbook CFG formula, and a sequential reference of RCFG written out here."""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline

from broadcast_filter.diffusion.batch import drive
from broadcast_filter.diffusion.schedule import strength_to_t_index_list
from broadcast_filter.diffusion.stream import PromptEmbeds, StreamConfig, StreamPipeline

SIZE = 64
ATOL = 1e-5  # fp32 on CPU: batching changes only summation order


def frames(count: int, seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> list[torch.Tensor]:
    """Distinct input frames, (1, 3, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((1, 3, *size), generator=g) for _ in range(count)]


def make(models, **kw) -> StreamPipeline:
    config = StreamConfig(**{"width": SIZE, "height": SIZE, "guidance_scale": 1.5, **kw})
    pipe = StreamPipeline(models, config)
    pipe.set_prompt("a watercolor portrait", "blurry, low quality")
    return pipe


def fixed_noise(pipe: StreamPipeline, level: int) -> torch.Tensor:
    """The documented noise layout: level i's noise is the i-th draw from the seed."""
    g = torch.Generator().manual_seed(pipe.config.seed)
    draws = [torch.randn((1, *pipe._latent_shape), generator=g) for _ in range(level + 1)]
    return draws[level]


# --------------------------------------------------------------------------- schedule


def test_timesteps_are_the_lcm_schedule_indexed_by_t_index_list(tiny_models):
    pipe = make(tiny_models, t_index_list=(0, 32, 45))
    # LCM's 50-step schedule over 1000 training steps is 999, 979, ..., 19.
    assert pipe._schedule.timesteps.tolist() == [999, 999 - 20 * 32, 999 - 20 * 45]


def test_coefficients_and_one_step_equal_lcm_scheduler_step(tiny_models):
    pipe = make(tiny_models, t_index_list=(10, 32, 45))
    reference = LCMScheduler.from_config(tiny_models.scheduler.config)
    reference.set_timesteps(50)
    g = torch.Generator().manual_seed(1)
    for level, t in enumerate(pipe._schedule.timesteps.tolist()):
        abar = reference.alphas_cumprod[t]
        s = pipe._schedule
        assert s.a[level].item() == pytest.approx(abar.sqrt().item(), rel=1e-6)
        assert s.b[level].item() == pytest.approx((1 - abar).sqrt().item(), rel=1e-6)
        x_t = torch.randn((1, 4, 8, 8), generator=g)
        eps = torch.randn((1, 4, 8, 8), generator=g)
        reference._step_index = None
        expected = reference.step(eps, t, x_t, return_dict=True).denoised
        ours = s.c_out[level] * (x_t - s.b[level] * eps) / s.a[level] + s.c_skip[level] * x_t
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- stream batch


@pytest.mark.parametrize("levels", [(20, 40), (10, 30, 45)], ids=["n=2", "n=3"])
@pytest.mark.parametrize("cfg_type", ["none", "self", "initialize", "full"])
def test_stream_batch_equals_sequential_denoising_of_the_frame_n_minus_1_earlier(
    tiny_models, levels, cfg_type
):
    batched = make(tiny_models, t_index_list=levels, cfg_type=cfg_type, use_stream_batch=True)
    sequential = make(tiny_models, t_index_list=levels, cfg_type=cfg_type, use_stream_batch=False)
    inputs = frames(6)
    expected = [sequential(x) for x in inputs]
    lag = len(levels) - 1
    assert batched.latency_frames == lag
    for k, x in enumerate(inputs):
        out = batched(x)
        # The first frame primes the buffer, so the first outputs are frame 0's.
        torch.testing.assert_close(out, expected[max(0, k - lag)], atol=ATOL, rtol=0)


def test_frame_buffer_size_batches_frames_and_still_equals_sequential(tiny_models):
    kw = {"t_index_list": (20, 40), "frame_buffer_size": 2, "cfg_type": "self"}
    batched = make(tiny_models, use_stream_batch=True, **kw)
    sequential = make(tiny_models, use_stream_batch=False, **kw)
    inputs = [torch.cat(pair) for pair in zip(frames(4, seed=1), frames(4, seed=2), strict=True)]
    expected = [sequential(x) for x in inputs]
    for k, x in enumerate(inputs):
        out = batched(x)
        assert out.shape == (2, 3, SIZE, SIZE)
        torch.testing.assert_close(out, expected[max(0, k - 1)], atol=ATOL, rtol=0)
    assert not torch.allclose(out[0], out[1])


# --------------------------------------------------------------------------- residual CFG


class Reference:
    """Sequential StreamDiffusion written from the formulas, for one frame through all levels.

    eps_u is ``delta * stock``; the stock starts as the level-0 noise (``initialize``: the real
    negative prediction at level 0) and moves to level i+1 as
    ``n_{i+1} + a_{i+1}/b_{i+1} * [c_out_i (b_i stock_i - b_i eps_i)/a_i + c_skip_i b_i stock_i]``.
    """

    def __init__(self, pipe: StreamPipeline) -> None:
        self.pipe = pipe
        self.unet = pipe.models.unet
        s = pipe._schedule
        self.t = s.timesteps.tolist()
        self.a, self.b = s.a.flatten().tolist(), s.b.flatten().tolist()
        self.c_skip, self.c_out = s.c_skip.flatten().tolist(), s.c_out.flatten().tolist()

    def eps(self, x: torch.Tensor, t: int, embeds: torch.Tensor) -> torch.Tensor:
        return self.unet(x, torch.tensor([t]), embeds).sample

    def __call__(self, image: torch.Tensor, cfg: str, g: float, delta: float) -> torch.Tensor:
        pipe, emb = self.pipe, self.pipe._embeds
        x = self.a[0] * drive(pipe._encode(image)) + self.b[0] * fixed_noise(pipe, 0)
        stock = fixed_noise(pipe, 0)
        for i, t in enumerate(self.t):
            eps_c = self.eps(x, t, emb.cond)
            if cfg == "full":
                eps_u = self.eps(x, t, emb.uncond)
            else:
                if cfg == "initialize" and i == 0:
                    stock = self.eps(x, t, emb.uncond)
                eps_u = delta * stock
            eps = eps_c if cfg == "none" else eps_u + g * (eps_c - eps_u)
            x0 = self.c_out[i] * (x - self.b[i] * eps) / self.a[i] + self.c_skip[i] * x
            if i + 1 == len(self.t):
                return drive(pipe._decode(x0))
            noise = fixed_noise(pipe, i + 1)
            carried = self.b[i] * stock
            left = (
                self.c_out[i] * (carried - self.b[i] * eps) / self.a[i] + self.c_skip[i] * carried
            )
            stock = noise + self.a[i + 1] / self.b[i + 1] * left
            x = self.a[i + 1] * x0 + self.b[i + 1] * noise
        raise AssertionError("unreachable")


@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
def test_cfg_modes_follow_their_formulas_with_stream_batch(tiny_models, cfg_type):
    g, delta = 1.8, 0.7
    pipe = make(
        tiny_models, t_index_list=(25, 40), cfg_type=cfg_type, guidance_scale=g, delta=delta
    )
    reference = Reference(pipe)
    inputs = frames(4, seed=3)
    with torch.inference_mode():
        expected = [reference(x, cfg_type, g, delta) for x in inputs]
    for k, x in enumerate(inputs):
        torch.testing.assert_close(pipe(x), expected[max(0, k - 1)], atol=ATOL, rtol=0)


def test_full_cfg_equals_textbook_formula_with_two_separate_unet_calls(tiny_models):
    g = 2.5
    pipe = make(tiny_models, t_index_list=(30,), cfg_type="full", guidance_scale=g)
    image = frames(1)[0]
    with torch.inference_mode():
        t = pipe._schedule.timesteps
        a, b = pipe._schedule.a[0], pipe._schedule.b[0]
        x = a * drive(pipe._encode(image)) + b * fixed_noise(pipe, 0)
        eps_c = tiny_models.unet(x, t, pipe._embeds.cond).sample
        eps_u = tiny_models.unet(x, t, pipe._embeds.uncond).sample
        eps = eps_u + g * (eps_c - eps_u)
        x0 = pipe._schedule.c_out[0] * (x - b * eps) / a + pipe._schedule.c_skip[0] * x
        expected = drive(pipe._decode(x0))
    torch.testing.assert_close(pipe(image), expected, atol=ATOL, rtol=0)


def test_guidance_at_or_below_one_is_plain_conditional(tiny_models):
    outs = []
    for cfg_type in ("none", "full", "self", "initialize"):
        pipe = make(tiny_models, t_index_list=(30,), cfg_type=cfg_type, guidance_scale=1.0)
        outs.append(pipe(frames(1)[0]))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- vs diffusers


def test_one_step_img2img_equals_diffusers_img2img_pipeline(tiny_models_taesd):
    """diffusers' img2img samples the VAE posterior; with TAESD (deterministic latents) both
    pipelines must agree exactly for the same timestep and the same seeded noise."""
    m = tiny_models_taesd
    pipe = make(m, t_index_list=(32,), cfg_type="none", guidance_scale=1.0, seed=7)
    pipe.set_prompt("a watercolor portrait")
    image = frames(1, seed=5)[0]
    reference = StableDiffusionImg2ImgPipeline(
        vae=m.vae,
        text_encoder=m.text_encoder,
        tokenizer=m.tokenizer,
        unet=m.unet,
        scheduler=LCMScheduler.from_config(m.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    timestep = pipe._schedule.timesteps.tolist()
    expected = reference(
        "a watercolor portrait",
        image=image,
        timesteps=timestep,
        strength=1.0,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).images
    torch.testing.assert_close(pipe(image), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- live changes


def test_prompt_change_reaches_the_next_call_and_no_output_is_grey_black_or_nan(tiny_models):
    pipe = make(tiny_models, t_index_list=(20, 35, 45), cfg_type="self")
    seen: list[torch.Tensor] = []
    hook = tiny_models.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(
            (kwargs.get("encoder_hidden_states", args[2])).clone()
        ),
        with_kwargs=True,
    )
    try:
        inputs = frames(8)
        outs = [pipe(x) for x in inputs[:4]]
        new = pipe.encode_prompt("a neon cyberpunk city at night")
        pipe.set_prompt_embeds(new)
        seen.clear()
        outs += [pipe(x) for x in inputs[4:]]
    finally:
        hook.remove()
    assert seen, "the UNet was not called after the prompt change"
    for hidden in seen:  # every UNet input after the change is conditioned on the new prompt
        torch.testing.assert_close(hidden, new.cond.expand_as(hidden))
    for out in outs:
        assert torch.isfinite(out).all()
        assert out.std() > 0.02, "constant (grey/black) frame"
        assert out.mean() > 0.02, "black frame"


def test_prompt_embeddings_are_computed_once_per_prompt(tiny_models):
    pipe = make(tiny_models, t_index_list=(20, 40))
    calls = []
    hook = tiny_models.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        for _ in range(3):
            pipe.set_prompt("a cat", "dog")
        for x in frames(4):
            pipe(x)
        pipe.set_prompt("a dog")
        pipe.set_prompt("a cat", "dog")
    finally:
        hook.remove()
    assert len(calls) == 1 + 1  # "a cat"/"dog" once, "a dog" once


def test_blend_is_the_weighted_mean_of_two_prompts(tiny_models):
    pipe = make(tiny_models)
    a, b = pipe.encode_prompt("a cat", "x"), pipe.encode_prompt("a dog", "y")
    mid = a.lerp(b, 0.25)
    torch.testing.assert_close(mid.cond, 0.75 * a.cond + 0.25 * b.cond)
    torch.testing.assert_close(mid.uncond, 0.75 * a.uncond + 0.25 * b.uncond)
    assert isinstance(mid, PromptEmbeds)


@pytest.mark.parametrize(
    "change",
    [
        {"guidance_scale": 2.0},
        {"delta": 0.5},
        {"seed": 99},
        {"t_index_list": (15, 30)},
        {"t_index_list": (15, 30, 44)},
        {"cfg_type": "initialize"},
    ],
    ids=lambda c: next(iter(c)) + ("-len" if len(c.get("t_index_list", ())) == 3 else ""),
)
def test_live_parameter_change_matches_a_fresh_pipeline_after_it_settles(tiny_models, change):
    """After a live change, once the frames in flight have left, the output equals a
    pipeline built with the new settings from the start; nothing in between is bad."""
    live = make(tiny_models, t_index_list=(20, 40), cfg_type="self")
    inputs = frames(8, seed=11)
    for x in inputs[:3]:
        live(x)
    live.update(**change)
    fresh = make(tiny_models, **{"t_index_list": (20, 40), "cfg_type": "self", **change})
    settle = live.levels - 1
    for k, x in enumerate(inputs[3:]):
        out, ref = live(x), fresh(x)
        assert torch.isfinite(out).all() and out.std() > 0.02
        if k >= settle:
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_invalid_live_change_is_rejected_and_keeps_the_previous_settings(tiny_models):
    pipe = make(tiny_models, t_index_list=(20, 40))
    with pytest.raises(ValueError, match="t_index_list"):
        pipe.update(t_index_list=(40, 20))
    with pytest.raises(ValueError, match="cfg_type"):
        pipe.update(cfg_type="double")
    assert pipe.config.t_index_list == (20, 40) and pipe.config.cfg_type == "self"


# --------------------------------------------------------------------------- shapes, modes


@pytest.mark.parametrize("size", [(128, 72), (96, 56), (64, 64)], ids=str)
def test_any_multiple_of_8_resolution_including_16_9(tiny_models, size):
    width, height = size
    pipe = make(tiny_models, width=width, height=height, t_index_list=(20, 40))
    out = pipe(torch.rand(1, 3, height, width))
    assert out.shape == (1, 3, height, width)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_bad_resolution_and_bad_input_shape_are_clear_errors(tiny_models):
    with pytest.raises(ValueError, match="multiples of 8"):
        make(tiny_models, width=100)
    pipe = make(tiny_models)
    with pytest.raises(ValueError, match=r"\(1, 3, 64, 64\)"):
        pipe(torch.rand(1, 3, 32, 32))


def test_txt2img_produces_changing_frames_without_an_input(tiny_models):
    pipe = make(tiny_models, mode="txt2img", t_index_list=(0, 16, 32, 45))
    outs = [pipe() for _ in range(5)]
    assert all(o.shape == (1, 3, SIZE, SIZE) and torch.isfinite(o).all() for o in outs)
    assert not torch.allclose(outs[-1], outs[-2])


def test_a_step_never_reads_tensors_back_to_the_host(tiny_models, monkeypatch):
    pipe = make(tiny_models, t_index_list=(20, 35, 45), cfg_type="initialize")
    pipe(frames(1)[0])  # prime outside the guard

    def forbidden(*_a, **_k):
        raise AssertionError("host round-trip inside a step")

    for name in ("item", "tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = pipe(frames(1, seed=2)[0])
    monkeypatch.undo()
    assert torch.isfinite(out).all()


def test_strength_maps_to_levels():
    assert strength_to_t_index_list(1.0, 50, 1) == (0,)
    assert strength_to_t_index_list(0.3, 50, 1) == (35,)
    assert strength_to_t_index_list(0.36, 50, 2) == (32, 41)
    levels = strength_to_t_index_list(0.9, 50, 4)
    assert len(levels) == 4 and list(levels) == sorted(set(levels)) and levels[-1] < 50
    with pytest.raises(ValueError):
        strength_to_t_index_list(0.0)
