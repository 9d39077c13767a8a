"""The whole daemon on network sources and outputs, with real peers on loopback: an RTMP
publisher that drops and returns, nginx-rtmp killed mid-stream, and ``broadcast-filter run``
with ``--source udp://`` / ``--output udp://`` read back by an independent PyAV reader.

The daemon runs the ``passthrough`` preset so the publisher's pixel stamp (tests/peers.py:
counter + send time) reaches the output; the recording sink reads it from every output frame.
Outages are judged by output counts per 1 s window (at least one frame in each: the
output repeats its last frame, it never stops), never by single-frame timings; what is
asserted holds on a busy machine too (CI runs these beside a CPU hog).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import peers
import pytest
from conftest import require_tool
from daemon_harness import RecordingSink, running, wait_for, window_counts, write_config

pytestmark = [pytest.mark.slow, pytest.mark.peers]

FPS = 15
SIZE = (256, 96)  # the stamp's 72 blocks of 16 px need 256 x 80
#: a window without any output frame is a stall; on an idle machine each holds ~FPS frames
WINDOW, MIN_PER_WINDOW = 1.0, 1
PEERS = str(Path(__file__).with_name("peers.py"))
ROOT = Path(__file__).resolve().parents[1]


RECORD_STAMPS = {"url": "bf-record", "options": {"reader": "stamp"}}


def publisher(url: str, fmt: str, *, start: int, seconds: float = 30) -> subprocess.Popen:
    """A PyAV publisher in its own process: stamped frames at the daemon's size and rate."""
    argv = [sys.executable, PEERS, "publish", "--url", url, "--format", fmt, "--fps", str(FPS),
            "--size", f"{SIZE[0]}x{SIZE[1]}", "--frames", str(int(seconds * FPS)),
            "--start", str(start)]  # fmt: skip
    return peers.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(autouse=True)
def _stop_peers():
    """Every peer process a test started is stopped by PID, also when the test failed."""
    yield
    peers.stop_all()


def counters_at_or_above(sink: RecordingSink, since: float, base: int) -> list[int]:
    return [c for _, c in sink.since(since) if c is not None and c >= base]


def says_lost(daemon) -> str | None:
    """The status line, when it says the source is gone (daemon mode: ``source lost`` or the
    no-signal slate) and reconnecting (the source's own state: waiting, retrying)."""
    text = daemon.status_text(time.monotonic())
    source = daemon.stats()["fields"]["source"]
    gone = "source lost" in text or "no signal" in text
    retrying = any(word in source for word in ("lost", "waiting for publisher", "retrying"))
    return text if gone and retrying else None


def check_outage(sink: RecordingSink, lost_at: float, back_at: float, what: str) -> list[int]:
    counts = window_counts(sink, lost_at, back_at, width=WINDOW)
    print(f"\n{what}: output frames per {WINDOW:g} s window from the drop to the return: {counts}")
    assert len(counts) >= 1, f"outage too short to judge: {back_at - lost_at:.2f} s"
    assert min(counts) >= MIN_PER_WINDOW, f"output stalled during the outage: {counts}"
    return counts


def test_rtmp_publisher_drops_and_returns_output_never_stops(tmp_path, model_cache):
    port = peers.free_port()
    url = f"rtmp://127.0.0.1:{port}/live/k"
    config = write_config(tmp_path, source=f"{url}?listen=1", sinks=[RECORD_STAMPS], size=SIZE,
                          fps=FPS, start="passthrough", cache_dir=model_cache)  # fmt: skip
    with running(config) as (daemon, _, lines):
        sink = RecordingSink.last
        first = publisher(url, "flv", start=0)
        try:
            t0 = time.monotonic()
            wait_for("the first publisher's frames at the output",
                     lambda: counters_at_or_above(sink, t0, 0), 20)  # fmt: skip
            print(f"\nfirst stamped frame out {time.monotonic() - t0:.2f} s after publishing")
            time.sleep(1.0)
        finally:
            peers.stop(first, grace=0)  # SIGTERM: the publisher dies mid-stream
        lost_at = time.monotonic()
        status = wait_for("the status to say the source is lost", lambda: says_lost(daemon), 10)
        print(f"status while lost: {status}")
        time.sleep(1.5)
        second = publisher(url, "flv", start=100_000)
        try:
            back = wait_for("the returning publisher's frames at the output",
                            lambda: counters_at_or_above(sink, lost_at, 100_000), 20)  # fmt: skip
            back_at = next(t for t, c in sink.since(lost_at) if c is not None and c >= 100_000)
            print(f"returning publisher on the output {back_at - lost_at:.2f} s after the drop, "
                  f"first counters {back[:5]}")  # fmt: skip
            check_outage(sink, lost_at, back_at, "RTMP publisher drop")
            later = wait_for("new frames from the returning publisher",
                             lambda: (c := counters_at_or_above(sink, back_at, 100_000))
                             and len(set(c)) >= FPS // 2 and c, 30)  # fmt: skip
            # the output repeats a frame when the input is late, never goes back
            assert later == sorted(later), later[:20]
            assert "live" in daemon.stats()["fields"]["source"]
        finally:
            peers.stop(second)
        out = daemon.stats()["frames_out"]
        print(f"daemon frames out {out}; status lines: {len(lines.lines)}")
        assert out >= len(sink.times) - 1


def test_nginx_killed_mid_stream_output_never_stops_and_pull_recovers(tmp_path, model_cache):
    require_tool("nginx")
    if missing := peers.nginx_missing():
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    nginx = peers.Nginx().start()
    config = write_config(tmp_path, source=nginx.url("k"), sinks=[RECORD_STAMPS], size=SIZE,
                          fps=FPS, start="passthrough", cache_dir=model_cache)  # fmt: skip
    procs = [publisher(nginx.url("k"), "flv", start=0)]
    try:
        with running(config) as (daemon, _, _lines):
            sink = RecordingSink.last
            t0 = time.monotonic()
            wait_for("frames through nginx at the output",
                     lambda: counters_at_or_above(sink, t0, 0), 25)  # fmt: skip
            time.sleep(1.0)
            nginx.kill()  # SIGKILL, as a crash
            lost_at = time.monotonic()
            peers.stop(procs[0], grace=0)
            status = wait_for("the status to say the source is lost", lambda: says_lost(daemon), 10)
            print(f"\nstatus while nginx is down: {status}")
            time.sleep(1.5)
            nginx = peers.Nginx(port=nginx.port).start()  # same address, fresh server
            procs.append(publisher(nginx.url("k"), "flv", start=200_000))
            wait_for("frames from the new publisher through the new nginx",
                     lambda: counters_at_or_above(sink, lost_at, 200_000), 30)  # fmt: skip
            back_at = next(t for t, c in sink.since(lost_at) if c is not None and c >= 200_000)
            print(f"pull recovered: new frames out {back_at - lost_at:.2f} s after the kill")
            check_outage(sink, lost_at, back_at, "nginx-rtmp killed")
    finally:
        for proc in procs:
            peers.stop(proc)
        nginx.stop()


def test_cli_run_udp_source_to_udp_output_read_by_pyav(tmp_path, model_cache):
    """``broadcast-filter run --source udp://... --output udp://...`` as a user runs it."""
    require_tool("ffmpeg")  # not used by the peers here; the CLI path needs nothing else
    p_in, p_out = peers.free_port(socket.SOCK_DGRAM), peers.free_port(socket.SOCK_DGRAM)
    config = write_config(tmp_path, source="testsrc", sinks=["null"], size=SIZE, fps=FPS,
                          start="passthrough", cache_dir=model_cache)  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "broadcast_filter.cli", "run", "--config", str(config),
            "--source", f"udp://127.0.0.1:{p_in}",
            "--output", f"udp://127.0.0.1:{p_out}"]  # fmt: skip
    log = (tmp_path / "run.log").open("w+")
    daemon = peers.spawn(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)

    def logged() -> str:
        log.seek(0)
        return log.read()

    publisher(f"udp://127.0.0.1:{p_in}", "mpegts", start=0, seconds=120)
    wait_for("the daemon to say its source is live", lambda: "source live" in logged(), 90)
    read = [sys.executable, PEERS, "read", "--url", f"udp://127.0.0.1:{p_out}",
            "--format", "mpegts", "--seconds", "8"]  # fmt: skip
    reader = subprocess.run(read, capture_output=True, text=True, timeout=60)
    got = json.loads(reader.stdout)
    daemon.send_signal(signal.SIGINT)
    assert daemon.wait(30) == 0
    text = logged()
    counters = got["counters"]
    print(f"\nCLI udp->udp: {len(counters)} stamped frames read back, counters "
          f"{counters[:3]}..{counters[-3:]}, latency publisher->reader median "
          f"{sorted(got['latencies'])[len(counters) // 2]:.0f} ms")  # fmt: skip
    print("\n".join(line for line in text.splitlines() if "source" in line)[-600:])
    assert got["sizes"] == [list(SIZE)]
    # the output repeats the newest frame when the input is late: never goes back
    assert len(set(counters)) >= FPS and counters == sorted(counters)
    assert "source live" in text
    assert f"out udp://127.0.0.1:{p_out} " in text  # the output's own state on the status line
