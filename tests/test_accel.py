"""Acceleration switches change speed, not results; warm-up leaves a clean stream."""

from __future__ import annotations

import pytest
import torch

from broadcast_filter.diffusion.accel import accelerate, warm_up
from broadcast_filter.diffusion.models import load_models
from broadcast_filter.diffusion.spec import Acceleration, ModelSpec
from broadcast_filter.diffusion.stream import StreamConfig, StreamPipeline


def outputs(models, count: int = 4) -> list[torch.Tensor]:
    pipe = StreamPipeline(models, StreamConfig(width=64, height=64, t_index_list=(20, 40)))
    pipe.set_prompt("a cat in a hat", "blurry")
    g = torch.Generator().manual_seed(0)
    return [pipe(torch.rand((1, 3, 64, 64), generator=g)) for _ in range(count)]


@pytest.fixture
def fresh_tiny(model_cache):
    """A private copy: acceleration changes modules in place."""
    return lambda: load_models(
        ModelSpec(id="tiny", dtype="float32", cache_dir=model_cache), progress=False
    )


@pytest.mark.parametrize(
    "accel",
    [Acceleration(channels_last=True), Acceleration(attention="classic")],
    ids=lambda a: a.describe(),
)
def test_switch_keeps_outputs(fresh_tiny, accel):
    baseline = outputs(fresh_tiny())
    for got, want in zip(outputs(accelerate(fresh_tiny(), accel)), baseline, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_torch_compile_keeps_outputs(fresh_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    baseline = outputs(fresh_tiny())
    compiled = accelerate(fresh_tiny(), Acceleration(compile=True))
    for got, want in zip(outputs(compiled), baseline, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_cuda_graphs_need_compile_on_cuda(fresh_tiny):
    with pytest.raises(ValueError, match="cuda_graphs"):
        accelerate(fresh_tiny(), Acceleration(cuda_graphs=True))


def test_warm_up_leaves_the_stream_as_if_new(tiny_models):
    config = StreamConfig(width=64, height=64, t_index_list=(20, 35, 45))
    warmed, fresh = StreamPipeline(tiny_models, config), StreamPipeline(tiny_models, config)
    for pipe in (warmed, fresh):
        pipe.set_prompt("a cat")
    assert warm_up(warmed, progress=False) > 0
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        image = torch.rand((1, 3, 64, 64), generator=g)
        torch.testing.assert_close(warmed(image), fresh(image))
