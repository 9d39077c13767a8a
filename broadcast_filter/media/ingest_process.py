"""Ingest process: open a live stream with PyAV, decode it, and write RGB frames to stdout.

Started by :class:`broadcast_filter.media.network.NetworkSource` through the
:mod:`~broadcast_filter.media.supervisor`, settings on stdin (see :mod:`wire`). It never
exits on a network error: it reports a state and opens the stream again — at once for a
listener (a publisher that comes back must find someone listening), after an exponential
backoff for a pull. Probing is :data:`~broadcast_filter.media.sources.LIVE_PROBE`; the open
timeout is longer than the probe (a shorter one kills the probe and resets the publisher's
connection). End of stdin means the daemon is gone: the process stops its bridge and exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import BinaryIO

import av
import av.error

from broadcast_filter.backoff import Backoff
from broadcast_filter.media import portable, wire
from broadcast_filter.media.sources import LIVE_PROBE
from broadcast_filter.media.srt_bridge import free_udp_port, start_srt_bridge


class Reporter:
    """Writes frames and state changes to the parent, in order."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.index = 0
        self._last: tuple[int, str] | None = None

    def state(self, code: int, text: str) -> None:
        if (code, text) != self._last:
            self._last = (code, text)
            wire.write_text(self.out, wire.STATE, code, text, time.monotonic())

    def frame(self, frame: av.VideoFrame) -> None:
        image = frame.to_ndarray(format="rgb24")
        wire.write_frame(self.out, image, time.monotonic(), self.index)
        self.index += 1


def reason(exc: BaseException) -> str:
    """The error without the URL (which may hold a stream key)."""
    return getattr(exc, "strerror", None) or type(exc).__name__


def ingest(spec: dict, report: Reporter, bridge: subprocess.Popen[bytes] | None = None) -> None:
    url, fmt, label = spec["url"], spec["format"], spec["label"]
    listen = bool(spec["listen"])
    options = dict(LIVE_PROBE)
    if spec["low_delay"] and fmt == "mpegts":
        # One PES packet = one frame (what FFmpeg, OBS and GStreamer muxers write): skip the
        # H.264 parser, which holds each frame until the next one starts (a frame of delay).
        options["fflags"] = "+noparse"
    if listen and url.startswith("rtmp"):
        options["listen"] = "1"
        # Waiting for a publisher is the normal case: no open timeout, so a publisher that
        # arrives late is never cut off mid-probe. The parent stops us by PID.
        timeout = (None, spec["read_timeout"])
    else:
        timeout = (spec["open_timeout"], spec["read_timeout"])
    backoff = Backoff(*spec["backoff"])
    waiting = f"waiting for publisher on {label}" if listen else f"connecting to {label}"
    while True:
        report.state(wire.CONNECTING, waiting)
        try:
            container = av.open(url, format=fmt, options=options, timeout=timeout)
        except av.error.FFmpegError as exc:
            if bridge is not None and bridge.poll() is not None:
                raise SystemExit(f"srt-live-transmit exited with code {bridge.returncode}") from exc
            if not listen:
                delay = backoff.step()
                why = f"cannot open ({reason(exc)}), retrying in {delay:g}s"
                report.state(wire.CONNECTING, why)
                time.sleep(delay)
            continue  # a listener that heard nothing yet just keeps waiting
        live, why = False, "end of stream"
        try:
            stream = container.streams.video[0]
            stream.codec_context.thread_type = "SLICE"  # frame threads add a frame of delay each
            decoder = stream.codec_context
            try:
                for packet in container.demux(stream):
                    for frame in decoder.decode(packet):
                        if not live:
                            live = True
                            backoff.reset()
                            report.state(wire.LIVE, "live")
                        report.frame(frame)
            except av.error.FFmpegError as exc:  # a publisher that leaves is an I/O error
                why = reason(exc)
                for frame in decoder.decode(None):  # so its last frame is not lost
                    report.frame(frame)
        except (av.error.FFmpegError, IndexError) as exc:
            why = "no video stream" if isinstance(exc, IndexError) else reason(exc)
        finally:
            container.close()
        code = wire.LOST if live else wire.CONNECTING
        if listen:
            report.state(code, f"lost ({why}), waiting for publisher")
        else:
            delay = backoff.step()
            report.state(code, f"lost ({why}), retrying in {delay:g}s")
            time.sleep(delay)


def main() -> None:
    portable.die_with_parent()
    spec = wire.read_spec(sys.stdin.buffer)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # stray prints must not corrupt the frame pipe
    bridge = None
    if spec.get("srt"):
        port = free_udp_port()
        bridge = start_srt_bridge(spec["srt"], port, inbound=True)
        spec["url"] = f"udp://127.0.0.1:{port}?overrun_nonfatal=1&fifo_size=50000"
        # reading UDP returns every few seconds, so SIGTERM can stop the bridge cleanly
        portable.exit_on_sigterm()

    def stop_bridge() -> None:
        if bridge is not None:
            portable.stop_process(bridge)

    portable.exit_when_stdin_closes(sys.stdin.buffer, stop_bridge)
    try:
        ingest(spec, Reporter(out), bridge)
    except BrokenPipeError:
        pass  # the daemon closed the source
    finally:
        stop_bridge()


if __name__ == "__main__":
    main()
