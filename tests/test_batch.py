"""Several streams in one UNet call: the same outputs as separate pipelines, frame for frame.

The reference is each stream's own :class:`StreamPipeline` run alone (which
``test_stream.py`` checks against diffusers and the textbook formulas); the batched run
shares every call it can, and the UNet's forward hook counts and sizes the calls."""

from __future__ import annotations

import pytest
import torch

from broadcast_filter.diffusion.batch import drive_together
from broadcast_filter.diffusion.stream import StreamConfig, StreamPipeline

ATOL = 1e-5  # fp32 on CPU: another batch changes only the summation order
FRAMES = 5

STREAMS = [
    # prompt, negative, config
    ("a watercolor portrait", "blurry", dict(t_index_list=(25, 40), cfg_type="self", seed=1)),
    ("neon city at night", "", dict(t_index_list=(20, 35), cfg_type="full", seed=7)),
    ("pencil sketch", "colour", dict(t_index_list=(30, 45), cfg_type="initialize", seed=3)),
    ("oil painting", "", dict(t_index_list=(32,), cfg_type="none", seed=11)),
    ("pop art", "", dict(t_index_list=(25, 40), use_stream_batch=False, seed=5)),
]


def pipes(models, chosen: list[int], size: int = 32) -> list[StreamPipeline]:
    out = []
    for i in chosen:
        prompt, negative, kw = STREAMS[i]
        config = StreamConfig(width=size, height=size, guidance_scale=1.6, delta=0.8, **kw)
        pipe = StreamPipeline(models, config)
        pipe.set_prompt(prompt, negative)
        out.append(pipe)
    return out


def inputs(n: int, seed: int, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((1, 3, size, size), generator=g) for _ in range(n)]


class UNetCalls:
    """Batch sizes of the UNet's forward calls, through a forward hook."""

    def __init__(self, unet) -> None:
        self.sizes: list[int] = []
        self._handle = unet.register_forward_hook(
            lambda module, args, out: self.sizes.append(args[0].shape[0])
        )

    def close(self) -> None:
        self._handle.remove()


@pytest.mark.parametrize("chosen", [[0, 1], [0, 1, 2], [0, 2, 3, 4]], ids=["n2", "n3", "mixed"])
def test_batched_streams_equal_separate_pipelines_frame_for_frame(tiny_models, chosen):
    alone, together = pipes(tiny_models, chosen), pipes(tiny_models, chosen)
    feeds = [inputs(FRAMES, seed=10 + i) for i in range(len(chosen))]
    calls_alone = UNetCalls(tiny_models.unet)
    with torch.inference_mode():
        expected = [[pipe(x) for x in feed] for pipe, feed in zip(alone, feeds, strict=True)]
    calls_alone.close()
    calls = UNetCalls(tiny_models.unet)
    try:
        for k in range(FRAMES):
            got = drive_together([p.step(feed[k]) for p, feed in zip(together, feeds, strict=True)])
            for s, out in enumerate(got):
                assert not isinstance(out, BaseException), out
                torch.testing.assert_close(out, expected[s][k], atol=ATOL, rtol=0)
    finally:
        calls.close()

    # Steady state (every Stream Batch primed): the first call of a round holds every
    # stream's elements; a sequential stream (one element per level) adds rounds.
    def elements(p: StreamPipeline) -> int:
        cfg = p.config.cfg_type
        n = p.levels if p.config.use_stream_batch else 1
        return n * (2 if cfg == "full" else 1) + (1 if cfg == "initialize" else 0)

    per_round = sum(elements(p) for p in together)
    rounds = max(1 if p.config.use_stream_batch else p.levels for p in together)
    assert max(calls.sizes) == per_round
    assert calls.sizes[-rounds] == per_round
    assert sum(calls.sizes) == sum(calls_alone.sizes)  # the same work, in fewer calls
    assert len(calls.sizes) <= len(calls_alone.sizes) - (len(chosen) - 1) * (FRAMES - 1)


def test_streams_of_another_size_get_their_own_call_and_the_same_outputs(tiny_models):
    small, large = pipes(tiny_models, [0], size=32)[0], pipes(tiny_models, [1], size=48)[0]
    ref_small, ref_large = pipes(tiny_models, [0], size=32)[0], pipes(tiny_models, [1], size=48)[0]
    xs, xl = inputs(3, seed=1, size=32), inputs(3, seed=2, size=48)
    with torch.inference_mode():
        expected = [(ref_small(a), ref_large(b)) for a, b in zip(xs, xl, strict=True)]
    calls = UNetCalls(tiny_models.unet)
    try:
        for k in range(3):
            calls.sizes.clear()
            out_s, out_l = drive_together([small.step(xs[k]), large.step(xl[k])])
            torch.testing.assert_close(out_s, expected[k][0], atol=ATOL, rtol=0)
            torch.testing.assert_close(out_l, expected[k][1], atol=ATOL, rtol=0)
        assert sorted(calls.sizes) == [2, 4]  # 2 levels; 2 levels with full CFG
    finally:
        calls.close()


def test_a_failing_stream_leaves_the_others_styled(tiny_models):
    good, bad = pipes(tiny_models, [0, 1])
    ref = pipes(tiny_models, [0])[0]
    x = inputs(2, seed=4)
    wrong = torch.rand((1, 3, 16, 16))  # not the stream's frame size: that step raises
    with torch.inference_mode():
        expected = [ref(xi) for xi in x]
    for k in range(2):
        out_good, out_bad = drive_together([good.step(x[k]), bad.step(wrong)])
        assert isinstance(out_bad, ValueError) and "expects an image tensor" in str(out_bad)
        torch.testing.assert_close(out_good, expected[k], atol=ATOL, rtol=0)


def test_a_model_fault_reaches_every_stream_of_the_call(tiny_models):
    a, b = pipes(tiny_models, [0, 1])
    x = inputs(1, seed=5)[0]

    def fail(module, args):
        raise RuntimeError("injected UNet fault")

    handle = tiny_models.unet.register_forward_pre_hook(fail)
    try:
        results = drive_together([a.step(x), b.step(x)])
    finally:
        handle.remove()
    assert all(isinstance(r, RuntimeError) and "injected" in str(r) for r in results)
    with torch.inference_mode():  # and both streams work again afterwards
        assert torch.isfinite(a(x)).all() and torch.isfinite(b(x)).all()
