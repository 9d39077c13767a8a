"""Host <-> model frame transfer: exact values, geometry, and no per-frame allocations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from broadcast_filter.runtime.frames import FrameTransfer


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_upload_is_nchw_in_unit_range_and_download_round_trips_exactly():
    transfer = FrameTransfer(32, 24, torch.device("cpu"), torch.float32)
    image = rgb(24, 32)
    tensor = transfer.upload(image)
    assert tensor.shape == (1, 3, 24, 32)
    expected = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(tensor, expected)
    back = transfer.download(tensor)
    assert back.shape == (24, 32, 3) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, image)


def test_download_rounds_and_clamps():
    transfer = FrameTransfer(8, 8, torch.device("cpu"), torch.float32)
    values = torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 127.5 / 255, 1.0, 1.7])
    out = torch.zeros(1, 3, 8, 8)
    out.view(-1)[: len(values)] = values
    flat = transfer.download(out).transpose(2, 0, 1).reshape(-1)
    assert flat[: len(values)].tolist() == [0, 0, 0, 1, 128, 255, 255]


def test_frame_buffer_of_two_and_shape_errors():
    transfer = FrameTransfer(16, 16, torch.device("cpu"), torch.float32, frames=2)
    batch = np.stack([rgb(16, 16, 1), rgb(16, 16, 2)])
    np.testing.assert_array_equal(transfer.download(transfer.upload(batch)), batch)
    with pytest.raises(ValueError, match=r"\(16, 16, 3\)"):
        transfer.upload(rgb(8, 8))


def test_download_returns_an_array_the_caller_owns():
    transfer = FrameTransfer(8, 8, torch.device("cpu"), torch.float32)
    first = transfer.download(transfer.upload(rgb(8, 8, 1)))
    kept = first.copy()
    transfer.download(transfer.upload(rgb(8, 8, 2)))
    np.testing.assert_array_equal(first, kept)


def test_steady_state_upload_and_download_allocate_no_tensors():
    transfer = FrameTransfer(64, 64, torch.device("cpu"), torch.float32)
    image = rgb(64, 64)
    transfer.download(transfer.upload(image))  # first call may set up kernels
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(3):
            transfer.download(transfer.upload(image))  # numpy's result array is not a tensor
    allocations = [e for e in prof.events() if e.name == "[memory]" and e.cpu_memory_usage > 0]
    assert allocations == []
