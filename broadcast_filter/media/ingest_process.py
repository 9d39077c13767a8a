"""Ingest process: open a live stream with PyAV, decode it, and write RGB frames to stdout.

Started by :class:`broadcast_filter.media.network.NetworkSource` through the
:mod:`~broadcast_filter.media.supervisor`, settings on stdin (see :mod:`wire`). It never
exits on a network error: it reports a state and opens the stream again — at once for a
listener (a publisher that comes back must find someone listening), after an exponential
backoff for a pull. Probing is :data:`~broadcast_filter.media.sources.LIVE_PROBE`; the open
timeout is longer than the probe (a shorter one kills the probe and resets the publisher's
connection). End of stdin means the daemon is gone: the process stops its bridge and exits.

Frames are stamped with the time their timestamps say they were captured, on this machine's
monotonic clock (:class:`~broadcast_filter.media.audio.MediaClock`). The first audio stream, when
there is one, is decoded too and sent as float32 in its own rate and channels
(:mod:`~broadcast_filter.media.audio`), stamped on the same clock, so audio and video captured at
one instant carry one time. AAC-LC frames are also sent as they came (raw, without ADTS headers), on
the same clock, for sinks that copy them. Audio that cannot be decoded is skipped and said on the
audio state; the video goes on. A video packet the decoder refuses (one before the first keyframe,
when the stream was joined mid-way, or one damaged on the way) is skipped and counted on the state,
as players do: the picture resumes at the next keyframe."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import BinaryIO

import av
import av.error

from broadcast_filter.backoff import Backoff
from broadcast_filter.media import portable, wire
from broadcast_filter.media.aac import coded_frame, stream_config
from broadcast_filter.media.audio import AudioConverter, CodedAudio, MediaClock, describe
from broadcast_filter.media.sources import LIVE_PROBE
from broadcast_filter.media.srt_bridge import free_udp_port, start_srt_bridge


class Reporter:
    """Writes frames, audio and state changes to the parent, in order."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.index = 0
        self._last: tuple[int, str] | None = None
        self.new_connection()

    def state(self, code: int, text: str) -> None:
        if (code, text) != self._last:
            self._last = (code, text)
            wire.write_text(self.out, wire.STATE, code, text, time.monotonic())

    def audio_state(self, text: str) -> None:
        wire.write_text(self.out, wire.STATE, wire.AUDIO_STATE, text, time.monotonic())

    def frame(self, frame: av.VideoFrame) -> None:
        image = frame.to_ndarray(format="rgb24")
        captured_at = self.clock.video(frame.time, time.monotonic())
        wire.write_frame(self.out, image, captured_at, self.index)
        self.index += 1

    def audio(self, frame: av.AudioFrame, media_time: float | None) -> None:
        """Send a decoded audio frame; without a timestamp it follows the previous one."""
        start = media_time if media_time is not None else self._audio_next
        if start is not None and frame.sample_rate:
            self._audio_next = start + frame.samples / frame.sample_rate
        samples = self._audio.convert(frame)
        if len(samples):
            at = self.clock.at(start, time.monotonic())
            wire.write_audio(self.out, samples, at, self._audio.rate)

    def coded(self, frame: CodedAudio, media_time: float) -> None:
        """Send one AAC-LC frame as it came (for sinks that copy it), stamped as its audio."""
        wire.write_coded(self.out, frame, self.clock.at(media_time, time.monotonic()))

    def new_connection(self) -> None:
        """Timestamps start again: a new media clock, a resampler without leftovers."""
        self.clock = MediaClock()
        self._audio = AudioConverter()
        self._audio_next: float | None = None


def reason(exc: BaseException) -> str:
    """The error without the URL (which may hold a stream key)."""
    return getattr(exc, "strerror", None) or type(exc).__name__


class NoVideo(Exception):
    """The stream opened but has no video to filter."""


class AudioDecoder:
    """Decodes the stream's audio packets to the parent. A bad packet is skipped (the line
    fills the hole with silence) and counted on the audio state; a stream that yields nothing
    but errors (:data:`GIVE_UP_AFTER` in a row: unsupported, garbage) is dropped, said once,
    and the video goes on. ``split``: the demuxer's parser is off (``+noparse``), so one
    packet is a whole PES packet, which holds several audio frames: the codec's parser
    splits it, and the frames after the first follow on from it."""

    GIVE_UP_AFTER = 50

    def __init__(self, stream: av.AudioStream | None, report: Reporter, *, split: bool) -> None:
        self.stream, self.report = stream, report
        self._parser = (
            av.CodecContext.create(stream.codec_context.name, "r") if stream and split else None
        )
        self.name = describe(stream.codec_context if stream else None)
        self._aac = stream is not None and stream.codec_context.name == "aac"
        self._config = stream_config(stream.codec_context) if stream else None
        self.bad = self._failing = 0
        report.audio_state(self.name)

    def decode(self, packet: av.Packet) -> None:
        if self.stream is None:
            return
        codec = self.stream.codec_context
        media_time = None if packet.pts is None else float(packet.pts * packet.time_base)
        coded_time = media_time  # of each AAC frame in the packet, for the copy
        try:
            for part in self._parser.parse(bytes(packet)) if self._parser else [packet]:
                frames = codec.decode(part)
                aac = self._aac and frames
                coded = coded_frame(bytes(part), self._config, frames[0]) if aac else None
                if coded is not None and coded_time is not None:
                    self.report.coded(coded, coded_time)
                if coded_time is not None and frames and frames[0].sample_rate:
                    coded_time += sum(f.samples for f in frames) / frames[0].sample_rate
                for frame in frames:
                    self.report.audio(frame, media_time)
                    media_time = None
        except (av.error.FFmpegError, ValueError) as exc:
            self.bad += 1
            self._failing += 1
            if self._failing >= self.GIVE_UP_AFTER:
                self.stream = None
                self.report.audio_state(f"{self.name} undecodable ({reason(exc)}): dropped")
            elif self.bad & (self.bad - 1) == 0:  # 1, 2, 4, 8 ...: say it, never flood
                self.report.audio_state(f"{self.name}, {self.bad} bad packets skipped")
        else:
            self._failing = 0


class VideoDecoder:
    """Decodes the video packets to the parent, skipping (and counting on the state, at 1, 2,
    4, 8 ...) those the decoder refuses; :data:`GIVE_UP_AFTER` of them in a row without a
    picture is a broken stream (it is opened again)."""

    GIVE_UP_AFTER = 1000  # more than any keyframe interval a live encoder uses

    def __init__(
        self, stream: av.VideoStream, report: Reporter, waiting: str, on_live: Callable[[], None]
    ) -> None:
        self.codec, self.report, self.waiting = stream.codec_context, report, waiting
        self.on_live = on_live
        self.codec.thread_type = "SLICE"  # frame threads add a frame of delay each
        self.live = False
        self.skipped = self._failing = 0

    def decode(self, packet: av.Packet | None) -> None:
        try:
            frames = self.codec.decode(packet)
        except av.error.InvalidDataError:
            if packet is None:
                return
            self.skipped += 1
            self._failing += 1
            if self._failing >= self.GIVE_UP_AFTER:
                raise
            if self.skipped & (self.skipped - 1) == 0:  # 1, 2, 4, 8 ...: say it, never flood
                self._say()
            return
        for frame in frames:
            self._failing = 0
            if not self.live:
                self.live = True
                self.on_live()
                self._say()
            self.report.frame(frame)

    def _say(self) -> None:
        skipped = f", {self.skipped} undecodable video packets skipped" if self.skipped else ""
        if self.live:
            self.report.state(wire.LIVE, "live" + skipped)
        else:
            self.report.state(wire.CONNECTING, f"{self.waiting}: waiting for a keyframe{skipped}")


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
    note = ""  # why the last publisher was turned away, shown while waiting for the next
    while True:
        report.state(wire.CONNECTING, waiting + note)
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
        why = "end of stream"
        report.new_connection()
        video = None
        try:
            if not container.streams.video:
                kinds = "audio only" if container.streams.audio else "no streams"
                raise NoVideo(f"no video stream in {label} ({kinds}): nothing to filter")
            note = ""
            stream = container.streams.video[0]
            video = VideoDecoder(stream, report, waiting, backoff.reset)
            audio = container.streams.audio[0] if container.streams.audio else None
            sound = AudioDecoder(audio, report, split="fflags" in options)
            streams = [stream] if audio is None else [stream, audio]
            try:
                for packet in container.demux(*streams):
                    if packet.stream is not stream:
                        sound.decode(packet)
                        continue
                    video.decode(packet)
            except av.error.FFmpegError as exc:  # a publisher that leaves is an I/O error
                why = reason(exc)
                video.decode(None)  # so its last frame is not lost
        except NoVideo as exc:
            why = str(exc)
            note = f"; the last publisher sent {why}"
        except av.error.FFmpegError as exc:
            why = reason(exc)
        finally:
            container.close()
        code = wire.LOST if video is not None and video.live else wire.CONNECTING
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
