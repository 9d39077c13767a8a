"""One exact frame rate everywhere: 29.97 and 59.94 through every H.264 encoder, read back.

``Fraction(29.97).limit_denominator(1001)`` is 2997/100, not NTSC's 30000/1001: a stream
labelled with it drifts from every camera and OBS canvas by 1 frame in 100 s. Network sinks
are read back by the ffmpeg CLI (an independent peer) copying the stream into a file, whose
H.264 timing (from the encoder's SPS) PyAV then reads; files are read by PyAV directly.
The NDI sink's rate is read by a receiver in tests/test_ndi.py.
"""

from __future__ import annotations

import signal
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import peers
import pytest
from conftest import require_tool

from broadcast_filter.media.network import RtmpSink, SrtSink, UdpSink
from broadcast_filter.media.open import open_sink
from broadcast_filter.media.rate import frame_rate
from broadcast_filter.media.sources import capture_input, screen_input

RATES = [(29.97, Fraction(30000, 1001)), (59.94, Fraction(60000, 1001))]
SIZE = (64, 64)


@pytest.mark.parametrize(
    ("fps", "exact"),
    [*RATES, (23.976, Fraction(24000, 1001)), (30000 / 1001, Fraction(30000, 1001)),
     (25, Fraction(25)), (30.0, Fraction(30)), (12.5, Fraction(25, 2)), (1, Fraction(1))],
)  # fmt: skip
def test_frame_rate_is_exact(fps, exact):
    assert frame_rate(fps) == exact


def test_frame_rate_refuses_a_rate_that_is_not_positive():
    with pytest.raises(ValueError, match="positive"):
        frame_rate(0)


def test_capture_and_screen_inputs_ask_for_the_exact_rate():
    assert capture_input("/dev/video0", system="Linux", fps=59.94).options["framerate"] == (
        "60000/1001"
    )
    assert screen_input(":0", system="Linux", fps=29.97).options["framerate"] == "30000/1001"


def rates_of(path: Path) -> tuple[Fraction, Fraction]:
    """(the H.264 stream's own frame rate, the container's average rate) as PyAV reads them."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        next(container.decode(stream))
        return stream.codec_context.framerate, stream.average_rate


@pytest.mark.parametrize(("fps", "exact"), RATES)
@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_file_sink_writes_the_exact_rate(tmp_path, fps, exact, suffix):
    path = tmp_path / f"out{suffix}"
    with open_sink(str(path), width=SIZE[0], height=SIZE[1], fps=fps, audio="off") as sink:
        for _ in range(10):
            sink.send(np.zeros((SIZE[1], SIZE[0], 3), np.uint8))
    codec_rate, average_rate = rates_of(path)
    assert codec_rate == exact
    if suffix == ".mp4":  # Matroska keeps millisecond timestamps: its average is approximate
        assert average_rate == exact


def ffmpeg_listener(url: str, out: Path, *, listen_flag: bool) -> subprocess.Popen:
    """The ffmpeg CLI receiving ``url`` and copying the H.264 stream (untouched) into ``out``."""
    argv = ["ffmpeg", "-hide_banner", "-loglevel", "error", *(["-listen", "1"] * listen_flag),
            "-i", url, "-c", "copy", "-frames:v", "20", "-y", str(out)]  # fmt: skip
    return peers.spawn(argv, stdin=subprocess.DEVNULL)  # stopped at teardown, by PID


NETWORK = {
    "udp": (UdpSink, peers.socket.SOCK_DGRAM, "udp://127.0.0.1:{port}", "udp://127.0.0.1:{port}"),
    "rtmp": (RtmpSink, peers.socket.SOCK_STREAM, "rtmp://127.0.0.1:{port}/live/k",
             "rtmp://127.0.0.1:{port}/live/k"),
    "srt": (SrtSink, peers.socket.SOCK_DGRAM, "srt://127.0.0.1:{port}?mode=listener",
            "srt://127.0.0.1:{port}?mode=caller"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.peers
@pytest.mark.parametrize(("fps", "exact"), RATES)
@pytest.mark.parametrize("kind", list(NETWORK))
def test_network_sinks_send_the_exact_rate(tmp_path, kind, fps, exact):
    require_tool("ffmpeg")
    if kind == "srt":
        require_tool("srt-live-transmit")
    sink_class, sock, listen_url, sink_url = NETWORK[kind]
    port = peers.free_port(sock)
    out = tmp_path / ("out.flv" if kind == "rtmp" else "out.ts")
    listener = ffmpeg_listener(listen_url.format(port=port), out, listen_flag=kind == "rtmp")
    sink = sink_class(sink_url.format(port=port), width=SIZE[0], height=SIZE[1], fps=fps,
                      backoff=(0.25, 1.0))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        i = 0
        while listener.poll() is None and time.monotonic() < deadline:
            sink.send(np.full((SIZE[1], SIZE[0], 3), i % 256, np.uint8))
            i += 1
            time.sleep(1 / fps)
    finally:
        sink.close()
        if listener.poll() is None:
            listener.send_signal(signal.SIGINT)
        peers.stop(listener)
        peers.stop_all()
    assert listener.returncode == 0, f"ffmpeg exit {listener.returncode}; sink: {sink.state}"
    assert rates_of(out)[0] == exact
