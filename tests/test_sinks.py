"""Sinks: null, H.264 files that survive a killed process, virtual camera via pyvirtualcam."""

import os
import signal
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path
from typing import ClassVar

import av
import numpy as np
import pytest
import pyvirtualcam
from pyvirtualcam.camera import BACKENDS

from broadcast_filter.media.base import MediaError
from broadcast_filter.media.open import open_sink
from broadcast_filter.media.sinks import (
    FileSink,
    NullSink,
    VirtualCameraSink,
    list_virtual_cameras,
)
from broadcast_filter.media.sources import draw_counter, read_counter

W, H = 128, 72
ROOT = Path(__file__).resolve().parents[1]


def counted(i: int, width: int = W, height: int = H) -> np.ndarray:
    image = np.full((height, width, 3), 100, np.uint8)
    draw_counter(image, i)
    return image


def decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [
            (f.time, read_counter(f.to_ndarray(format="rgb24"))) for f in container.decode(stream)
        ]
        return frames, stream.average_rate


# --- null -----------------------------------------------------------------------------------


def test_null_sink_counts_and_checks_the_size():
    sink = open_sink("null", width=W, height=H, fps=30)
    assert isinstance(sink, NullSink)
    for i in range(3):
        sink.send(counted(i))
    assert sink.frames == 3
    with pytest.raises(ValueError, match=r"expects \(72, 128, 3\) uint8"):
        sink.send(np.zeros((H, W, 4), np.uint8))


# --- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fps", "rate"), [(30, Fraction(30)), (29.97, Fraction(30000, 1001))])
def test_file_timestamps_follow_the_frame_count(tmp_path, fps, rate):
    path = tmp_path / "out.mp4"  # without audio (with it, pts follow the send time)
    with open_sink(str(path), width=W, height=H, fps=fps, audio="off") as sink:
        assert isinstance(sink, FileSink)
        for i in range(12):
            sink.send(counted(i))
    frames, average_rate = decode(path)
    assert average_rate == rate
    assert [n for _, n in frames] == list(range(12))
    assert [t for t, _ in frames] == pytest.approx([i / rate for i in range(12)], abs=1e-3)


def test_file_with_audio_stamps_each_frame_with_the_time_it_goes_on_air(tmp_path):
    """With audio, pts follow the on-air time the daemon gives each frame (the clock the
    audio is placed on), not the moment the sink gets to it."""
    path = tmp_path / "out.mp4"
    times = [100.0, 100.1, 100.25, 100.3, 100.5]
    with open_sink(str(path), width=W, height=H, fps=30, audio="aac") as sink:
        for i, at in enumerate(times):
            sink.send(counted(i), at)
    frames, _ = decode(path)
    assert [n for _, n in frames] == list(range(len(times)))
    assert [t for t, _ in frames] == pytest.approx([at - times[0] for at in times], abs=1e-3)


def test_file_sink_options_from_the_url(tmp_path):
    with open_sink(
        f"file:{tmp_path / 'o.mkv'}?preset=ultrafast&gop=5", width=W, height=H, fps=25
    ) as sink:
        assert sink._stream.codec_context.gop_size == 5
        sink.send(counted(0))
    assert decode(tmp_path / "o.mkv")[0] == [(0.0, 0)]


def test_file_sink_refuses_odd_sizes_and_unknown_containers(tmp_path):
    with pytest.raises(MediaError, match="even width and height"):
        FileSink(tmp_path / "a.mp4", width=127, height=72, fps=30)
    with pytest.raises(MediaError, match=r"accepted forms(.|\n)*PATH.mp4"):
        open_sink(str(tmp_path / "a.avi"), width=W, height=H, fps=30)


WRITER = """
import sys, time
import numpy as np
from broadcast_filter.media.open import open_sink
from broadcast_filter.media.sources import draw_counter
sink = open_sink(sys.argv[1], width={W}, height={H}, fps=30, audio="off")
for i in range(int(sys.argv[2])):
    image = np.full(({H}, {W}, 3), 100, np.uint8)
    draw_counter(image, i)
    sink.send(image)
try:
    print("written", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    sink.close()
"""


def write_and_kill(path: Path, frames: int, sig: signal.Signals) -> None:
    """Write ``frames`` frames from a separate process, then kill it with ``sig``."""
    script = textwrap.dedent(WRITER).format(W=W, H=H)
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(path), str(frames)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline() == "written\n"
    child.send_signal(sig)
    child.wait(timeout=60)  # generous: a busy machine may take long to flush; a hang still fails


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_recording_cut_by_sigkill_still_decodes(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    write_and_kill(path, 75, signal.SIGKILL)
    frames, _ = decode(path)
    # keyframes at 0, 30 and 60: only the open fragment (60..74, under 1 s) may be lost
    assert 60 <= len(frames) <= 75
    assert [n for _, n in frames] == list(range(len(frames)))
    assert [t for t, _ in frames] == pytest.approx([i / 30 for i in range(len(frames))], abs=1e-3)


def test_recording_stopped_by_sigint_keeps_every_frame(tmp_path):
    path = tmp_path / "stopped.mp4"
    write_and_kill(path, 45, signal.SIGINT)
    frames, _ = decode(path)
    assert [n for _, n in frames] == list(range(45))


# --- virtual camera -------------------------------------------------------------------------


class MemoryBackend:
    """pyvirtualcam backend that keeps frames in memory.

    A test double because this machine has no v4l2loopback (no kernel modules) and no OBS
    virtual camera; it goes through pyvirtualcam's documented ``register_backend`` hook.
    """

    opened: ClassVar[list["MemoryBackend"]] = []

    def __init__(self, *, width, height, fps, fourcc, device, **kw):
        self.width, self.height, self.fourcc = width, height, fourcc
        self._device = device or "memory0"
        self.frames: list[np.ndarray] = []
        self.closed = 0
        MemoryBackend.opened.append(self)

    def send(self, frame):
        self.frames.append(frame.copy())

    def close(self):
        self.closed += 1

    def device(self):
        return self._device

    def native_fourcc(self):
        return self.fourcc


@pytest.fixture
def memory_backend():
    MemoryBackend.opened.clear()
    pyvirtualcam.register_backend("memory", MemoryBackend)
    yield MemoryBackend.opened
    del BACKENDS["memory"]


def test_virtual_camera_gets_frames_in_order_at_its_size(memory_backend):
    with open_sink("vcam:studio?backend=memory", width=W, height=H, fps=30) as sink:
        assert isinstance(sink, VirtualCameraSink)
        assert (sink.backend, sink.device) == ("memory", "studio")
        for i in range(5):
            sink.send(counted(i))
    (camera,) = memory_backend
    assert (camera.width, camera.height, camera.closed) == (W, H, 1)
    assert [read_counter(f.reshape(H, W, 3)) for f in camera.frames] == list(range(5))


def test_virtual_camera_rejects_a_wrong_frame_size(memory_backend):
    sink = VirtualCameraSink(width=W, height=H, fps=30, backend="memory")
    with sink, pytest.raises(ValueError, match="expects"):
        sink.send(np.zeros((H + 1, W, 3), np.uint8))


def test_listing_finds_a_working_backend(memory_backend):
    assert any(
        d.available and d.url == "vcam:memory0?backend=memory" for d in list_virtual_cameras()
    )


def test_unknown_backend_lists_the_ones_there_are():
    with pytest.raises(
        MediaError, match=r"unknown virtual camera backend 'nope'; this machine has"
    ):
        open_sink("vcam?backend=nope", width=W, height=H, fps=30)


def real_backend_works() -> bool:
    return any(d.available for d in list_virtual_cameras())


@pytest.mark.skipif(real_backend_works(), reason="this machine has a working virtual camera")
def test_no_virtual_camera_refuses_to_start_and_says_what_to_install():
    with pytest.raises(MediaError) as error:
        open_sink("vcam", width=W, height=H, fps=30)
    message = str(error.value)
    assert "no virtual camera could be opened" in message
    if sys.platform == "linux":
        assert "modprobe v4l2loopback" in message and "v4l2loopback-dkms" in message
    else:
        assert "OBS" in message
    (entry,) = list_virtual_cameras()
    assert not entry.available
    assert "v4l2loopback" in entry.note or "OBS" in entry.note


@pytest.mark.skipif(os.path.exists("/dev/video10"), reason="this machine has /dev/video10")
def test_missing_virtual_camera_device_is_named():
    with pytest.raises(MediaError, match="/dev/video10"):
        open_sink("vcam:/dev/video10", width=W, height=H, fps=30)
