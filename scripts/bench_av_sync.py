"""A/V sync and the CPU cost of sound through the daemon (issue 12), with real peers.

Sync: the ffmpeg CLI publishes the sync pattern (``tests/sync_pattern.py``: a white flash and
a 1 kHz beep together every 2 s, H.264 + AAC) to the daemon, built in-process as
``broadcast-filter run`` builds it (``tests/daemon_harness.running``); the ffmpeg CLI records
each output (``-t N -c copy``) and the independent PyAV reader pairs every flash with its
beep: offset = beep - flash, positive when the audio is late. Cases: each source transport
(RTMP listener, UDP/MPEG-TS, SRT) in each mode: ``passthrough`` (the test model ``tiny``, the
engine bypassed) and ``styled`` (the demo model, demo preset ``sepia``, SSF off, so every
frame goes through the model). Outputs: UDP/MPEG-TS, plus RTMP through nginx for the RTMP
source when nginx-rtmp is installed. Recording starts once the daemon has the publisher's
audio and ``--settle`` seconds more, so start-up is not measured.

CPU: the same daemon path (RTMP listener in, UDP out, passthrough) with a publisher that
sends audio and one that sends none (``-an``), alternated in one daemon; in a second daemon
whose sink has ``audio: copy``, the publisher with audio (its AAC copied, not coded again);
in a third whose sink has ``audio: off``, the publisher without audio (no audio anywhere). CPU
seconds of this process (daemon threads) and its child processes (ingest, egress) per second
of stream, from /proc; the publisher is counted apart, nothing records.

    python scripts/bench_av_sync.py [--seconds 14] [--cpu-seconds 8] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peers
import sync_pattern
from daemon_harness import demo_config, running, wait_for, write_config

SIZE = (128, 128)  # the demo model's resolution
FPS = 15
MODES = ("passthrough", "styled")
TRANSPORTS = ("rtmp", "udp", "srt")
UDP_READ = "?fifo_size=100000&overrun_nonfatal=1"


# ---------------------------------------------------------------- configs and peers


def config_for(mode: str, folder: Path, source: str, sinks: list[Any], cache: str) -> Path:
    if mode == "styled":
        return demo_config(folder, source=source, sinks=sinks, start="sepia")
    return write_config(folder, source=source, sinks=sinks, size=SIZE, fps=FPS,
                        start="passthrough", cache_dir=cache)  # fmt: skip


def publisher_argv(
    url: str, fmt: str, seconds: float, size: tuple[int, int], audio: bool
) -> list[str]:
    """The sync pattern's publisher; without ``audio`` its beep input and AAC are left out
    (``-an``), so the sender computes no sound either."""
    argv = sync_pattern.publish_argv(url, fmt, size, FPS, seconds)
    if not audio:
        second_input = argv.index("-i", argv.index("-i") + 1)
        del argv[second_input - 3 : second_input + 2]  # -re -f lavfi -i <beep>
        codec = argv.index("-c:a")
        argv[codec : codec + 6] = ["-an"]  # -c:a aac -b:a 128k -ar 48000
    return argv


def publish(
    url: str, fmt: str, seconds: float, size: tuple[int, int] = SIZE, audio: bool = True
) -> subprocess.Popen:
    argv = publisher_argv(url, fmt, seconds, size, audio)
    return peers.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def record(url: str, path: Path, seconds: float) -> subprocess.Popen:
    """The ffmpeg CLI copies ``seconds`` of a stream into an MPEG-TS file, then exits."""
    argv = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", url,
            "-t", f"{seconds:g}", "-c", "copy", "-f", "mpegts", str(path)]  # fmt: skip
    return peers.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_listener(daemon: Any) -> None:
    wait_for("the RTMP listener", lambda: "waiting for publisher" in
             daemon.stats()["fields"].get("source", ""), 60)  # fmt: skip


def source_for(transport: str) -> tuple[str, str, str, Callable[[Any], None]]:
    """(daemon source URL, publisher URL, publisher format, wait until the daemon listens)."""
    if transport == "rtmp":
        url = f"rtmp://127.0.0.1:{peers.free_port()}/live/k"
        return f"{url}?listen=1", url, "flv", wait_for_listener
    port = peers.free_port(socket.SOCK_DGRAM)

    def bound(daemon: Any) -> None:
        wait_for("the source (or the SRT bridge) to bind", lambda: peers.udp_bound(port), 30)

    if transport == "udp":
        return f"udp://127.0.0.1:{port}", f"udp://127.0.0.1:{port}?pkt_size=1316", "mpegts", bound
    # ffmpeg's srt latency is in microseconds, srt-live-transmit's in milliseconds
    return (f"srt://:{port}?mode=listener&latency=40",
            f"srt://127.0.0.1:{port}?mode=caller&latency=40000", "mpegts", bound)  # fmt: skip


# ---------------------------------------------------------------- sync


def sync_case(transport: str, mode: str, seconds: float, settle: float, cache: str) -> list[dict]:
    """One daemon: publish the pattern, record every output, pair flashes with beeps."""
    folder = Path(tempfile.mkdtemp(prefix=f"av-{transport}-{mode}-"))
    try:
        outputs, errors, (delay, model_fps, off_sync), status = _sync_run(
            transport, mode, folder, seconds, settle, cache
        )
        print(f"done: {transport} {mode}; status: {status}", file=sys.stderr)
        rows = []
        for i, name in enumerate(outputs):
            row = {"in": transport, "out": name, "mode": mode, "model_fps": round(model_fps, 1),
                   "delay_ms": None if delay is None else round(delay * 1e3),
                   "off_sync": off_sync}  # fmt: skip
            if name in errors:
                rows.append({**row, "error": errors[name]})
            else:
                rows.append({**row, **summarize(sync_pattern.measure(str(folder / f"{i}.ts")))})
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _sync_run(transport: str, mode: str, folder: Path, seconds: float, settle: float, cache: str):
    """Run the case's daemon and recorders into ``folder``: (outputs, recorder errors, (the
    daemon's lasting delay, its model fps, "frames off sync / frames" while recording) at the
    end, its status line)."""
    with contextlib.ExitStack() as stack:
        stack.callback(peers.stop_all)
        source, target, fmt, ready = source_for(transport)
        udp = f"udp://127.0.0.1:{peers.free_port(socket.SOCK_DGRAM)}"
        outputs = {"udp": udp + UDP_READ}
        sinks: list[Any] = [udp]
        if transport == "rtmp" and not peers.nginx_missing():
            nginx = stack.enter_context(peers.Nginx())
            sinks.append(nginx.url("out"))
            outputs["rtmp (nginx)"] = nginx.url("out")
        config = config_for(mode, folder, source, sinks, cache)
        daemon, _, _ = stack.enter_context(running(config))
        ready(daemon)
        publisher = publish(target, fmt, seconds + settle + 30)
        wait_for("audio through the daemon", lambda: daemon.audio.received > 0, 60)
        time.sleep(settle)
        frames, off = daemon.delay.frames, daemon.delay.off_sync
        recorders = {name: record(url, folder / f"{i}.ts", seconds)
                     for i, (name, url) in enumerate(outputs.items())}  # fmt: skip
        errors = {}
        for name, recorder in recorders.items():
            try:
                if recorder.wait(seconds + 30) != 0:
                    errors[name] = recorder.stderr.read().decode(errors="replace")[-200:]
            except subprocess.TimeoutExpired:
                errors[name] = "the recorder did not finish"
        delay, model_fps = daemon.delay.delay, daemon.stats()["fps_model"]
        off_sync = f"{daemon.delay.off_sync - off}/{daemon.delay.frames - frames}"
        status = daemon.status_text(time.monotonic())
        peers.stop(publisher)
        return outputs, errors, (delay, model_fps, off_sync), status


def summarize(reading: sync_pattern.Reading) -> dict[str, Any]:
    offsets = reading.offsets
    if not offsets:
        return {"pairs": 0, "error": f"no pairs ({len(reading.flashes)} flashes, "
                                     f"{len(reading.beeps)} beeps)"}  # fmt: skip
    return {
        "pairs": len(offsets),
        "median_ms": round(statistics.median(offsets) * 1e3),
        "worst_ms": round(reading.worst * 1e3),
        "in_tolerance": int(sum(sync_pattern.EARLY <= o <= sync_pattern.LATE for o in offsets)),
        "offsets_ms": [round(o * 1e3) for o in offsets],
    }


# ---------------------------------------------------------------- CPU


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every live process."""
    stats: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return stats


def _tree(stats: dict[int, tuple[int, float]], root: int) -> set[int]:
    tree = {root}
    for _ in range(6):  # daemon -> I/O process -> setpriv/bridge -> ...
        tree |= {pid for pid, (ppid, _) in stats.items() if ppid in tree}
    return tree


def cpu_split(publisher: int) -> tuple[float, float, int]:
    """(CPU seconds of this process and its live descendants except the publisher's tree,
    CPU seconds of the publisher's tree, how many processes the first counts)."""
    stats = _proc_stats()
    pub = _tree(stats, publisher)
    ours = _tree(stats, os.getpid()) - pub
    return sum(stats[p][1] for p in ours), sum(stats[p][1] for p in pub), len(ours)


def cpu_window(
    daemon: Any, url: str, size: tuple[int, int], audio: bool, seconds: float, warmup: float
) -> dict[str, float]:
    """Publish to the daemon's RTMP listener, wait until frames (and audio) flow and
    ``warmup`` more, then measure CPU over ``seconds``; stop the publisher."""
    wait_for_listener(daemon)
    frames0, samples0 = daemon.source.received, daemon.audio.received if daemon.audio else 0
    publisher = publish(url, "flv", seconds + warmup + 30, size=size, audio=audio)
    try:
        wait_for("frames from the publisher", lambda: daemon.source.received > frames0, 60)
        if audio:
            wait_for("audio from the publisher", lambda: daemon.audio.received > samples0, 30)
        time.sleep(warmup)
        ours0, pub0, _ = cpu_split(publisher.pid)
        t0, frames1 = time.monotonic(), daemon.source.received
        time.sleep(seconds)
        ours1, pub1, processes = cpu_split(publisher.pid)
        wall, frames = time.monotonic() - t0, daemon.source.received - frames1
    finally:
        peers.stop(publisher)
    return {"cpu": (ours1 - ours0) / wall, "publisher": (pub1 - pub0) / wall,
            "fps_in": frames / wall, "processes": processes}  # fmt: skip


def cpu_bench(
    size: tuple[int, int], seconds: float, rounds: int, warmup: float, cache: str
) -> list[dict]:
    """Audio vs no audio (alternated, one daemon), then the source's AAC copied (sink audio
    copy), then no audio anywhere (sink audio off)."""
    variants = {
        "audio in, aac out": (True, "aac"),
        "no audio in (-an), aac out (silent track)": (False, "aac"),
        "audio in, copy out": (True, "copy"),
        "no audio in (-an), audio: off": (False, "off"),
    }
    got: dict[str, list[dict]] = {name: [] for name in variants}
    for sink_audio in ("aac", "copy", "off"):
        names = [n for n, (_, a) in variants.items() if a == sink_audio]
        folder = Path(tempfile.mkdtemp(prefix=f"av-cpu-{sink_audio}-"))
        url = f"rtmp://127.0.0.1:{peers.free_port()}/live/k"
        udp = f"udp://127.0.0.1:{peers.free_port(socket.SOCK_DGRAM)}"
        sink = {"url": udp, "options": {"audio": sink_audio}}
        config = write_config(folder, source=f"{url}?listen=1", sinks=[sink], size=size,
                              fps=FPS, start="passthrough", cache_dir=cache)  # fmt: skip
        try:
            with running(config) as (daemon, _, _):
                for _ in range(rounds):
                    for name in names:
                        audio = variants[name][0]
                        got[name].append(cpu_window(daemon, url, size, audio, seconds, warmup))
                        print(f"done: cpu {name}", file=sys.stderr)
        finally:
            peers.stop_all()
            shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for name, windows in got.items():
        rows.append({
            "variant": name,
            "windows": len(windows),
            "cpu_core_s_per_s": round(statistics.median(w["cpu"] for w in windows), 4),
            "each": [round(w["cpu"], 4) for w in windows],
            "publisher_core_s_per_s": round(statistics.median(w["publisher"] for w in windows), 4),
            "fps_in": round(statistics.median(w["fps_in"] for w in windows), 1),
            "processes": max(w["processes"] for w in windows),
        })  # fmt: skip
    return rows


def cpu_compare(rows: list[dict]) -> dict[str, Any]:
    """Extra CPU of audio: with audio minus each baseline, and the ratio."""
    by = {r["variant"]: r["cpu_core_s_per_s"] for r in rows}
    audio, names = by["audio in, aac out"], list(by)
    return {
        base: {"extra_core_s_per_s": round(audio - by[base], 4),
               "ratio": round(audio / by[base], 3) if by[base] else None}
        for base in names[1:]
    }  # fmt: skip


# ---------------------------------------------------------------- main


def table(rows: list[dict], header: list[str]) -> str:
    cells = [[str(r.get(h, "")) for h in header] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=14.0, help="recorded per sync case")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds after the first audio before recording")  # fmt: skip
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--cpu-seconds", type=float, default=6.0, help="per CPU window")
    parser.add_argument("--cpu-rounds", type=int, default=2)
    parser.add_argument("--cpu-size", default="512x512", help="video size of the CPU part")
    parser.add_argument("--skip-sync", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()
    transports = args.transports.split(",")
    if "srt" in transports and shutil.which("srt-live-transmit") is None:
        print("srt-live-transmit is not installed: no SRT case", file=sys.stderr)
        transports.remove("srt")
    cpu_size = tuple(int(v) for v in args.cpu_size.split("x"))
    cache = tempfile.mkdtemp(prefix="av-bench-models-")  # the offline tiny model is built here
    try:
        sync = [] if args.skip_sync else [
            row for t in transports for m in args.modes.split(",")
            for row in sync_case(t, m, args.seconds, args.settle, cache)
        ]  # fmt: skip
        cpu = [] if args.skip_cpu else cpu_bench(
            cpu_size, args.cpu_seconds, args.cpu_rounds, 2.0, cache)  # fmt: skip
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    compare = cpu_compare(cpu) if cpu else {}
    if args.json:
        print(json.dumps({"sync": sync, "cpu": cpu, "cpu_compare": compare}, indent=2))
        return
    if sync:
        print(f"A/V offset (beep - flash, + = audio late), tolerance "
              f"{sync_pattern.EARLY * 1e3:+.0f}..{sync_pattern.LATE * 1e3:+.0f} ms")  # fmt: skip
        columns = ["in", "out", "mode", "model_fps", "delay_ms", "off_sync", "pairs",
                   "median_ms", "worst_ms", "in_tolerance", "offsets_ms", "error"]  # fmt: skip
        print(table(sync, columns))
    if cpu:
        print(f"\nCPU per second of stream ({args.cpu_size}, {FPS} fps, passthrough, RTMP in, "
              "UDP out): this process + ingest/egress processes; publisher apart")  # fmt: skip
        print(table(cpu, ["variant", "windows", "cpu_core_s_per_s", "each",
                          "publisher_core_s_per_s", "fps_in", "processes"]))  # fmt: skip
        for base, c in compare.items():
            print(f"audio vs {base}: {c['extra_core_s_per_s']:+.4f} core-s/s, ratio {c['ratio']}")


if __name__ == "__main__":
    main()
