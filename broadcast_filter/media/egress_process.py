"""Egress process: read RGB frames from stdin, encode low-latency H.264 and send it.

Started by :class:`broadcast_filter.media.network.NetworkSink` as
``python -m broadcast_filter.media.egress_process``, settings on stdin (see ``handoff``).
A reader thread keeps only the newest frame, so a slow or dead connection never backs up
the daemon. The main thread connects (PyAV connects lazily and holds the GIL while it does,
which is why this is a process), encodes with libx264 ultrafast + zerolatency at a
constant-ish bitrate (bit_rate = maxrate = bufsize over one second), and on any error
reports the state, waits with exponential backoff and connects again with a fresh encoder.
End of stdin means "flush and exit".
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from fractions import Fraction
from typing import BinaryIO

import av
import av.error
import numpy as np

from broadcast_filter.media import handoff
from broadcast_filter.media.ingest_process import reason

Item = tuple[np.ndarray, float]

#: flush every packet at once; in MPEG-TS also write each video PES length so the receiving
#: demuxer can emit a frame when it is complete instead of when the next frame starts
#: (that is worth one frame interval of latency).
MUXER_OPTIONS = {
    "flv": {"flvflags": "no_duration_filesize", "flush_packets": "1"},
    "mpegts": {"omit_video_pes_length": "0", "flush_packets": "1"},
}


def read_frames(inp: BinaryIO, slot: handoff.LatestSlot[Item]) -> None:
    """Move frames from stdin into ``slot`` until end of stream, then close it."""
    try:
        while (message := handoff.read_message(inp)) is not None:
            if message.kind == handoff.FRAME:
                assert isinstance(message.payload, np.ndarray)
                slot.put((message.payload, message.t))
    finally:
        slot.close()


def open_output(spec: dict) -> tuple[av.container.OutputContainer, av.VideoStream]:
    fps = Fraction(spec["fps"]).limit_denominator(1001)
    bitrate = str(spec["bitrate"])
    options = MUXER_OPTIONS[spec["format"]]
    container = av.open(spec["url"], "w", format=spec["format"], options=options, timeout=5.0)
    stream = container.add_stream(
        "libx264",
        rate=fps,
        options={
            "preset": spec["preset"],
            "tune": "zerolatency",
            "g": str(spec["gop"]),
            "maxrate": bitrate,
            "bufsize": bitrate,
        },
    )
    stream.width, stream.height = spec["width"], spec["height"]
    stream.pix_fmt = "yuv420p"
    stream.bit_rate = spec["bitrate"]
    stream.codec_context.time_base = 1 / fps
    return container, stream


def send(
    container: av.container.OutputContainer,
    stream: av.VideoStream,
    slot: handoff.LatestSlot[Item],
    fps: float,
    report: BinaryIO,
) -> None:
    """Encode and mux frames until the slot closes; pts follow the time each frame was sent."""
    t0: float | None = None
    pts = -1
    dropped = slot.dropped
    while (item := slot.take()) is not None:
        if slot.dropped != dropped:
            dropped = slot.dropped
            handoff.write_text(report, handoff.DROPS, dropped, "")
        image, sent_at = item
        t0 = sent_at if t0 is None else t0
        pts = max(pts + 1, round((sent_at - t0) * fps))
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = pts
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def egress(spec: dict, slot: handoff.LatestSlot[Item], report: BinaryIO) -> None:
    label = spec["label"]
    backoff_min, backoff_max = spec["backoff"]
    backoff = backoff_min
    while not slot.closed:
        handoff.write_text(report, handoff.STATE, handoff.CONNECTING, f"connecting to {label}")
        container = None
        live = False
        try:
            container, stream = open_output(spec)
            container.start_encoding()  # connects now instead of at the first mux
            live, backoff = True, backoff_min
            handoff.write_text(report, handoff.STATE, handoff.LIVE, "live")
            send(container, stream, slot, spec["fps"], report)
        except (av.error.FFmpegError, OSError) as exc:
            what = "lost" if live else "cannot connect"
            code = handoff.LOST if live else handoff.CONNECTING
            text = f"{what} ({reason(exc)}), retrying in {backoff:g}s"
            handoff.write_text(report, handoff.STATE, code, text)
            slot.wait_closed(backoff)
            backoff = min(backoff * 2, backoff_max)
        finally:
            if container is not None:
                with contextlib.suppress(av.error.FFmpegError, OSError):
                    container.close()  # the connection may already be gone


def main() -> None:
    handoff.die_with_parent()
    inp = sys.stdin.buffer
    spec = handoff.read_spec(inp)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr
    bridge = None
    if spec.get("srt"):
        port = handoff.free_udp_port()
        bridge = handoff.start_srt_bridge(spec["srt"], port, inbound=False)
        spec["url"] = f"udp://127.0.0.1:{port}?pkt_size=1316"
    slot: handoff.LatestSlot[Item] = handoff.LatestSlot()
    threading.Thread(target=read_frames, args=(inp, slot), daemon=True).start()
    try:
        egress(spec, slot, out)
    except BrokenPipeError:
        pass
    finally:
        if bridge is not None:
            time.sleep(0.2)  # let the bridge forward the last datagrams
            handoff.stop_process(bridge)


if __name__ == "__main__":
    main()
