"""Frames between host and model: one upload and one download per frame, no allocations.

:class:`FrameTransfer` owns every buffer it needs, allocated once for one input size:
the uint8 frame is copied into a (pinned, on CUDA) host buffer, uploaded as uint8 (4x less
traffic than float), turned into the pipeline's ``(F, 3, H, W)`` float tensor in ``[0, 1]``
on the device, and the output goes back the
same way: scaled to uint8 on the device, one download. Constants are preallocated tensors
too, so a steady-state frame allocates nothing (``tests/test_frames.py`` counts).
"""

from __future__ import annotations

import numpy as np
import torch


class FrameTransfer:
    """Convert ``(H, W, 3)`` / ``(F, H, W, 3)`` uint8 RGB arrays to and from model tensors."""

    def __init__(
        self,
        width: int,
        height: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        frames: int = 1,
    ) -> None:
        self.width, self.height, self.frames = width, height, frames
        self.device, self.dtype = torch.device(device), dtype
        pin = self.device.type == "cuda"
        f = frames
        self._host_in = torch.empty((f, height, width, 3), dtype=torch.uint8, pin_memory=pin)
        self._dev_in = self._on_device(self._host_in)
        self._input = torch.empty((f, 3, height, width), device=self.device, dtype=dtype)
        self._scaled = torch.empty((f, 3, height, width), device=self.device, dtype=dtype)
        self._dev_out = torch.empty((f, height, width, 3), device=self.device, dtype=torch.uint8)
        self._host_out = (
            torch.empty((f, height, width, 3), dtype=torch.uint8, pin_memory=True)
            if pin
            else self._dev_out
        )
        self._inv255 = torch.tensor(1 / 255, device=self.device, dtype=dtype)
        self._255 = torch.tensor(255.0, device=self.device, dtype=dtype)
        self._half = torch.tensor(0.5, device=self.device, dtype=dtype)

    def _on_device(self, host: torch.Tensor) -> torch.Tensor:
        return host if self.device.type == "cpu" else torch.empty_like(host, device=self.device)

    def upload(self, images: np.ndarray) -> torch.Tensor:
        """The model input for ``images``; the returned tensor is reused by the next call."""
        expected = (self.frames, self.height, self.width, 3)
        batch = images[None] if images.ndim == 3 else images
        if batch.shape != expected or batch.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 frames {expected[1:]} (x{self.frames}), "
                f"got {images.dtype} {images.shape}"
            )
        self._host_in.numpy()[...] = batch
        if self._dev_in is not self._host_in:
            self._dev_in.copy_(self._host_in, non_blocking=True)
        self._input.copy_(self._dev_in.permute(0, 3, 1, 2)).mul_(self._inv255)
        return self._input

    def download(self, output: torch.Tensor) -> np.ndarray:
        """``(F, 3, H, W)`` in ``[0, 1]`` to a new ``(H, W, 3)`` (or ``(F, H, W, 3)``) uint8
        array that the caller owns."""
        torch.mul(output, self._255, out=self._scaled)
        self._scaled.clamp_(0, 255).add_(self._half)  # round half up on the uint8 cast
        self._dev_out.copy_(self._scaled.permute(0, 2, 3, 1))
        if self._host_out is not self._dev_out:
            self._host_out.copy_(self._dev_out)
        result = self._host_out.numpy().copy()
        return result[0] if self.frames == 1 else result
