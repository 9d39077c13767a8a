"""Corrupt input is survived: truncated files (written with PyAV, then cut) and garbage bytes
on the UDP ingest port, followed by a real stream that is then received."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import av
import numpy as np
import peers
import pytest
from test_daemon import SIZE, RecordingSink, make_daemon
from test_network_io import Collector, publisher, wait_state

from broadcast_filter.media.base import MediaError
from broadcast_filter.media.network import UdpSource
from broadcast_filter.media.open import open_source
from broadcast_filter.runtime.daemon import Limits


def write_video(path: Path, frames: int = 60) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=20)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((SIZE, SIZE, 3), (i * 4) % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.mark.parametrize("suffix", [".ts", ".mkv"])
def test_a_truncated_file_plays_what_it_has_then_ends_cleanly(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    write_video(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + os.urandom(512))  # cut mid-packet, then junk
    sink = RecordingSink()
    source = open_source(str(path), width=SIZE, height=SIZE, fps=20)
    daemon = make_daemon([("rec", sink)], cost=0.0, source=source, limits=Limits(duration=10))
    assert daemon.run() == 0 and daemon.failure is None
    assert daemon.stopped_because == "end of source" and len(sink.times) > 5


def test_a_file_cut_before_its_index_is_a_clear_error_not_a_crash(tmp_path):
    path = tmp_path / "cut.mp4"
    write_video(path)
    path.write_bytes(path.read_bytes()[:2000])
    try:
        source = open_source(str(path), width=SIZE, height=SIZE, fps=20)
        frames = list(source.frames())
    except MediaError as exc:
        assert str(path) in str(exc) or "cut.mp4" in str(exc)
    else:
        assert isinstance(frames, list)  # whatever decodes is fine; nothing raised


@pytest.mark.slow
@pytest.mark.peers
def test_garbage_on_the_udp_port_is_survived_and_a_real_stream_then_arrives():
    port = peers.free_port(socket.SOCK_DGRAM)
    collector = Collector(UdpSource(f"udp://127.0.0.1:{port}"))
    try:
        wait_state(collector.source, "waiting for publisher")
        rng = np.random.default_rng(6)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(400):
                size = 1316 if i % 2 else int(rng.integers(1, 1400))
                payload = bytes(rng.integers(0, 256, size, dtype=np.uint8))
                if i % 3 == 0:  # MPEG-TS sync bytes with garbage behind them
                    payload = b"".join(b"\x47" + payload[:187] for _ in range(7))
                sock.sendto(payload, ("127.0.0.1", port))
                time.sleep(0.002)
        time.sleep(1.0)  # the garbage drains through the demuxer first (not a synchronisation)
        before = len(collector.received.counters)
        publisher(f"udp://127.0.0.1:{port}?pkt_size=1316", "mpegts", frames=90).wait(30)
        collector.wait_for(
            lambda: len(collector.received.counters) >= before + 30, 20, "frames after garbage"
        )
    finally:
        collector.close()
