"""Egress process: read RGB frames (and audio) from stdin, encode low-latency H.264 (and AAC)
and send it.

Started by :class:`broadcast_filter.media.network.NetworkSink` through the
:mod:`~broadcast_filter.media.supervisor`, settings on stdin (see :mod:`wire`). A reader
thread moves frames into a :class:`~broadcast_filter.media.jitter.JitterBuffer`, so a brief
stall of the encoder loses nothing and a long one drops the oldest frames (counted, and
reported to the daemon). The main thread connects (PyAV connects lazily and holds the GIL
while it does, which is why this is a process), encodes (:mod:`h264`) and on any error
reports the state, waits with exponential backoff and connects again with a fresh encoder.
End of stdin means "flush and exit": the daemon closed the sink, or died.

Audio chunks, when the sink has an audio track, wait in their own short queue (not the
video's: a video frame dropped under load must not take sound with it) and are encoded by
:class:`~broadcast_filter.media.aac.AacTrack` on the video's timeline after each frame.
Audio in another rate or channel count than the track's (a publisher that arrived with its
own) makes the process connect again at once with a track in that format.
The muxer writes every packet as it comes (``max_interleave_delta``): audio is sent a little
after its video (it is produced behind the wall clock), and waiting for it would delay the
picture; each packet carries its own timestamp, which is what receivers sync on.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import BinaryIO

import av
import av.error
import numpy as np

from broadcast_filter.backoff import Backoff
from broadcast_filter.media import portable, wire
from broadcast_filter.media.aac import AacTrack, CopyTrack
from broadcast_filter.media.audio import CodedAudio, format_name
from broadcast_filter.media.h264 import (
    SEND_TIME_BASE,
    add_h264_stream,
    live_bitrate,
    send_time_pts,
)
from broadcast_filter.media.ingest_process import reason
from broadcast_filter.media.jitter import JitterBuffer
from broadcast_filter.media.srt_bridge import free_udp_port, start_srt_bridge

Item = tuple[np.ndarray, float]
#: samples (or a coded frame of the source's), on air at, rate
Audio = tuple[np.ndarray | CodedAudio, float, int]

#: flush every packet at once, without waiting to interleave (see the module docstring); in
#: MPEG-TS also write each video PES length so the receiving demuxer can emit a frame when it
#: is complete instead of when the next frame starts (that is worth one frame interval).
MUXER_OPTIONS = {
    "flv": {"flvflags": "no_duration_filesize", "flush_packets": "1"},
    "mpegts": {"omit_video_pes_length": "0", "flush_packets": "1"},
}
INTERLEAVE = {"max_interleave_delta": "1"}
#: audio chunks waiting for the encoder (one per output tick: 256 is 8 s at 30 fps)
AUDIO_QUEUE = 256


def read_frames(inp: BinaryIO, buffer: JitterBuffer[Item], audio: JitterBuffer[Audio]) -> None:
    """Move frames and audio from stdin into their buffers until end of stream, then close."""
    try:
        while (message := wire.read_message(inp)) is not None:
            if message.kind == wire.FRAME:
                assert isinstance(message.payload, np.ndarray)
                buffer.put((message.payload, message.t))
            elif message.kind == wire.AUDIO:
                assert isinstance(message.payload, np.ndarray)
                audio.put((message.payload, message.t, message.n))
            elif message.kind == wire.CODED:
                audio.put((wire.coded_of(message), message.t, message.n))
    finally:
        buffer.close()


def open_output(
    spec: dict,
) -> tuple[av.container.OutputContainer, av.VideoStream, AacTrack | None]:
    options = MUXER_OPTIONS[spec["format"]] | INTERLEAVE
    container = av.open(spec["url"], "w", format=spec["format"], options=options, timeout=5.0)
    stream = add_h264_stream(
        container,
        width=spec["width"],
        height=spec["height"],
        fps=spec["fps"],
        gop=spec["gop"],
        preset=spec["preset"],
        rate_control=live_bitrate(spec["bitrate"]),
        time_base=SEND_TIME_BASE,
    )
    kind = CopyTrack if spec["audio"] == "copy" else AacTrack
    track = (
        kind(container, spec["audio_bitrate"], spec["audio_rate"], spec["audio_channels"])
        if spec["audio"]
        else None
    )
    return container, stream, track


class FormatChanged(Exception):
    """The source's audio now comes in another rate or channel count: connect again in it."""

    def __init__(self, rate: int, channels: int) -> None:
        super().__init__(f"{rate} Hz, {channels} channels")
        self.rate, self.channels = rate, channels


class Drops:
    """Reports the buffer's running drop count to the daemon whenever it has changed: while
    live (before each frame) and while connecting or waiting to retry (every half second),
    so frames dropped during an outage are counted too."""

    def __init__(self, buffer: JitterBuffer[Item], report: BinaryIO) -> None:
        self.buffer, self.report, self.sent = buffer, report, 0

    def update(self) -> None:
        if (dropped := self.buffer.dropped) != self.sent:
            self.sent = dropped
            wire.write_drops(self.report, dropped)

    def wait(self, delay: float) -> None:
        """Sleep ``delay`` s (less if the buffer closes), reporting drops meanwhile."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            self.update()
            if self.buffer.wait_closed(min(left, 0.5)):
                break
        self.update()


def say_audio(report: BinaryIO, track: AacTrack) -> None:
    """The track's format, and for a copy whether it carries the source's frames now."""
    text = format_name(track.rate, track.channels)
    if isinstance(track, CopyTrack):
        text += ", copying the source's AAC" if track.copying else ", encoding AAC"
    wire.write_text(report, wire.STATE, wire.AUDIO_STATE, text)


def send(
    container: av.container.OutputContainer,
    stream: av.VideoStream,
    track: AacTrack | None,
    buffers: tuple[JitterBuffer[Item], JitterBuffer[Audio]],
    drops: Drops,
) -> None:
    """Encode and mux frames until the buffer closes; pts follow the time each frame was sent,
    and audio is placed by the time it goes on air, on the same timeline."""
    buffer, audio = buffers
    report = drops.report
    copying = False
    t0: float | None = None
    pts = -1
    while (item := buffer.take()) is not None:
        drops.update()
        image, sent_at = item
        t0 = sent_at if t0 is None else t0
        pts = send_time_pts(pts, sent_at, t0)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = pts
        container.mux(stream.encode(frame))
        while (chunk := audio.take(timeout=0)) is not None:
            payload, at, rate = chunk
            if track is None:
                continue
            if isinstance(payload, CodedAudio):  # the source's own frame (audio: copy)
                if isinstance(track, CopyTrack) and track.fits_coded(payload):
                    container.mux(track.add_coded(payload, at, t0))
                continue
            if not track.fits(rate, payload.shape[1]):
                raise FormatChanged(rate, payload.shape[1])
            container.mux(track.add(payload, at, t0, rate))
        if isinstance(track, CopyTrack) and track.copying != copying:
            copying = track.copying
            say_audio(report, track)
    container.mux(stream.encode(None))
    if track is not None:
        container.mux(track.flush())


def egress(
    spec: dict, buffers: tuple[JitterBuffer[Item], JitterBuffer[Audio]], report: BinaryIO
) -> None:
    label = spec["label"]
    backoff = Backoff(*spec["backoff"])
    buffer = buffers[0]
    drops = Drops(buffer, report)
    while not buffer.closed:
        drops.update()
        wire.write_text(report, wire.STATE, wire.CONNECTING, f"connecting to {label}")
        container = None
        live = False
        try:
            container, stream, track = open_output(spec)
            container.start_encoding()  # connects now instead of at the first mux
            live = True
            backoff.reset()
            wire.write_text(report, wire.STATE, wire.LIVE, "live")
            if track is not None:
                say_audio(report, track)
            send(container, stream, track, buffers, drops)
        except FormatChanged as change:  # not an error: no backoff
            spec["audio_rate"], spec["audio_channels"] = change.rate, change.channels
            text = f"the source's audio is now {format_name(change.rate, change.channels)}"
            wire.write_text(report, wire.STATE, wire.CONNECTING, f"{text}: connecting again")
        except (av.error.FFmpegError, OSError) as exc:
            what = "lost" if live else "cannot connect"
            code = wire.LOST if live else wire.CONNECTING
            delay = backoff.step()
            text = f"{what} ({reason(exc)}), retrying in {delay:g}s"
            wire.write_text(report, wire.STATE, code, text)
            drops.wait(delay)
        finally:
            if container is not None:
                with contextlib.suppress(av.error.FFmpegError, OSError):
                    container.close()  # the connection may already be gone


def main() -> None:
    portable.die_with_parent()
    inp = sys.stdin.buffer
    spec = wire.read_spec(inp)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr
    bridge = None
    if spec.get("srt"):
        port = free_udp_port()
        bridge = start_srt_bridge(spec["srt"], port, inbound=False)
        spec["url"] = f"udp://127.0.0.1:{port}?pkt_size=1316"
        portable.exit_on_sigterm()  # so the bridge is stopped on the way out
    buffers: tuple[JitterBuffer[Item], JitterBuffer[Audio]] = (
        JitterBuffer(spec["jitter_frames"]),
        JitterBuffer(AUDIO_QUEUE),
    )
    threading.Thread(target=read_frames, args=(inp, *buffers), daemon=True).start()
    try:
        egress(spec, buffers, out)
    except BrokenPipeError:
        pass
    finally:
        if bridge is not None:
            time.sleep(0.2)  # let the bridge forward the last datagrams
            portable.stop_process(bridge)


if __name__ == "__main__":
    main()
