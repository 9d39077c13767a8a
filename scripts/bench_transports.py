"""Latency and CPU cost of each network transport, our sink -> transport -> our source.

Every frame carries a counter and its send time in the pixels (``tests/peers.py``); the
receiver reads them as ``frames()`` yields the frame, so latency covers the egress process,
encode, transport (and bridge/server), demux, decode and the hand-off to the daemon.
CPU is all processes together (this process with sink and source, I/O processes, bridges,
nginx) over the measured run, start-up excluded; the harness's stamping is included.

    python scripts/bench_transports.py [--seconds 5] [--sizes 512x512,1280x720] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peers

from broadcast_filter.media import network
from broadcast_filter.media.base import Sink, Source, SourceLost

Pair = Callable[[ExitStack], tuple[Source, str]]


def _rtmp(stack: ExitStack) -> tuple[Source, str]:
    url = f"rtmp://127.0.0.1:{peers.free_port()}/live/bench"
    return network.RtmpSource(f"{url}?listen=1"), url


def _rtmp_nginx(stack: ExitStack) -> tuple[Source, str]:
    nginx = stack.enter_context(peers.Nginx())
    return network.RtmpSource(nginx.url("bench")), nginx.url("bench")


def _udp(stack: ExitStack) -> tuple[Source, str]:
    port = peers.free_port(socket.SOCK_DGRAM)
    return network.UdpSource(f"udp://127.0.0.1:{port}"), f"udp://127.0.0.1:{port}"


def _srt(stack: ExitStack) -> tuple[Source, str]:
    port = peers.free_port(socket.SOCK_DGRAM)
    source = network.SrtSource(f"srt://:{port}?mode=listener&latency=20")
    return source, f"srt://127.0.0.1:{port}?mode=caller&latency=20"


def _ndi(stack: ExitStack) -> tuple[Source, str]:
    from broadcast_filter.media.ndi import NdiSource

    name = f"bench-{time.monotonic_ns() % 100000}"
    return NdiSource(f"ndi:{name}", extra_ips="127.0.0.1"), f"ndi:{name}"


TRANSPORTS: dict[str, tuple[Pair, Callable[..., Sink]]] = {
    "rtmp (listen)": (_rtmp, network.RtmpSink),
    "rtmp via nginx": (_rtmp_nginx, network.RtmpSink),
    "udp mpegts": (_udp, network.UdpSink),
    "srt (bridged)": (_srt, network.SrtSink),
}


def _ndi_sink(url: str, **kw) -> Sink:
    from broadcast_filter.media.ndi import NdiSink

    return NdiSink(url, **kw)


def available() -> dict[str, tuple[Pair, Callable[..., Sink]]]:
    transports = dict(TRANSPORTS)
    if peers.nginx_missing():
        del transports["rtmp via nginx"]
    if shutil.which("srt-live-transmit") is None:
        del transports["srt (bridged)"]
    from broadcast_filter.media.ndi import is_installed

    if is_installed():
        transports["ndi"] = (_ndi, _ndi_sink)
    return transports


def cpu_seconds() -> float:
    """CPU time of this process and all its live descendants (I/O processes, bridges, nginx)."""
    stats: dict[int, tuple[int, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, total = {os.getpid()}, 0.0
    for _ in range(4):  # depth: daemon -> I/O process -> setpriv/bridge
        tree |= {pid for pid, (ppid, _) in stats.items() if ppid in tree}
    total = sum(stats[pid][1] for pid in tree if pid in stats)
    return total / os.sysconf("SC_CLK_TCK")


def run_one(name: str, pair: Pair, make_sink, size: tuple[int, int], seconds: float, fps: float):
    received = peers.Received()
    pictures = peers.Pictures(*size)
    frames = round(seconds * fps)
    with ExitStack() as stack:
        source, sink_url = pair(stack)
        stack.callback(source.close)
        sink = make_sink(sink_url, width=size[0], height=size[1], fps=fps)
        stack.callback(sink.close)

        def consume() -> None:
            while True:
                try:
                    for frame in source.frames():
                        received.add(frame.image)
                    return
                except SourceLost:
                    continue

        threading.Thread(target=consume, daemon=True).start()
        # warm-up: black-ish frames until the first one is seen, so start-up is not measured
        deadline = time.monotonic() + 20
        warm = 0
        while not received.counters and time.monotonic() < deadline:
            sink.send(pictures.get(10_000_000 + warm))
            warm += 1
            time.sleep(1 / fps)
        time.sleep(0.5)
        received.counters.clear()
        received.latencies.clear()
        cpu0, t0 = cpu_seconds(), time.monotonic()
        for i in peers._paced(frames, fps):
            sink.send(pictures.get(i))
        time.sleep(0.5)
        cpu, wall = cpu_seconds() - cpu0, time.monotonic() - t0
    got = [c for c in received.counters if c < frames]
    return {
        "transport": name,
        "size": f"{size[0]}x{size[1]}",
        "sent": frames,
        "received": len(got),
        "lost": frames - len(set(got)),
        "median_ms": round(received.median(), 1),
        "p95_ms": round(received.p95(), 1),
        "cpu_percent_core": round(100 * cpu / wall, 1),
        "cpu_ms_per_frame": round(1000 * cpu / frames, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--sizes", default="512x512,1280x720")
    parser.add_argument("--only", help="comma-separated transport names (default: all available)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    transports = available()
    if args.only:
        transports = {k: v for k, v in transports.items() if k in args.only.split(",")}
    rows = []
    for size in sizes:
        for name, (pair, make_sink) in transports.items():
            rows.append(run_one(name, pair, make_sink, size, args.seconds, args.fps))
            if not args.json:
                print(f"done: {name} {size}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    header = ["transport", "size", "sent", "received", "lost", "median_ms", "p95_ms",
              "cpu_percent_core", "cpu_ms_per_frame"]  # fmt: skip
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[h]).ljust(w) for h, w in zip(header, widths, strict=True)))


if __name__ == "__main__":
    main()
