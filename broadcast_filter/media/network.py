"""Network sources and sinks: RTMP, UDP/MPEG-TS and SRT, each run in its own I/O process.

Why a process: PyAV holds the GIL while it blocks inside FFmpeg (an RTMP listener waiting
for a publisher, a lazy RTMP connect at the first mux), which would freeze every thread of
the daemon. So each source runs ``python -m broadcast_filter.media.ingest_process`` and each
sink ``python -m broadcast_filter.media.egress_process``; frames cross a pipe (raw RGB, :mod:`wire`)
through a short jitter buffer on each side (a brief stall loses nothing, a long one drops
the oldest frames and counts them), and the process re-opens the stream by itself with backoff.

Sources (``--source``), registered as ``rtmp``, ``udp`` and ``srt``:

* ``rtmp://HOST:PORT/APP/KEY?listen=1`` — the daemon is the RTMP server: bind HOST:PORT
  and accept one publisher at a time on APP/KEY (OBS "Custom" server ``rtmp://HOST:PORT/APP``,
  stream key KEY). After the publisher leaves it listens again.
* ``rtmp://HOST:PORT/APP/KEY`` — pull (play) the stream from an RTMP server such as nginx-rtmp.
* ``udp://HOST:PORT`` — receive MPEG-TS on a local address (or multicast group) and port.
* ``srt://:PORT?mode=listener`` or ``srt://HOST:PORT?mode=caller`` — SRT (MPEG-TS inside).
  PyAV's FFmpeg has no SRT protocol, so the I/O process runs ``srt-live-transmit`` (Debian
  package ``srt-tools``) as a bridge between SRT and a private loopback UDP port. Query
  parameters go to srt-live-transmit as they are: ``latency`` is in milliseconds, and
  ``passphrase`` / ``streamid`` work as in its docs. An empty HOST means listener.

Sinks (``--output``), registered as ``rtmp``, ``udp`` and ``srt``, all H.264 (libx264
ultrafast, zerolatency, constant-ish bitrate) at the size and rate they were opened with:

* ``rtmp://HOST:PORT/APP/KEY`` — publish (FLV) to an RTMP server.
* ``udp://HOST:PORT`` — send MPEG-TS datagrams of 1316 bytes.
* ``srt://HOST:PORT?mode=caller`` or ``srt://:PORT?mode=listener`` — MPEG-TS over SRT via an
  ``srt-live-transmit`` bridge, as for the source.

A sink never blocks ``send()``: it copies the frame into a short jitter buffer; a worker
thread feeds the egress process, which connects, encodes and retries. One
:class:`~broadcast_filter.media.supervisor.Supervisor` runs and restarts each I/O process.
Stream keys and passphrases are masked (:func:`mask_url`) in every state string, log line
and exception.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from broadcast_filter.media import wire
from broadcast_filter.media.audio import AUDIO_BITRATE, CHANNELS, RATE, AudioChunk, CodedAudio
from broadcast_filter.media.base import (
    Frame,
    Sink,
    Source,
    SourceLost,
    audio_track,
    register_sink,
    register_source,
)
from broadcast_filter.media.egress_process import AUDIO_QUEUE
from broadcast_filter.media.jitter import JITTER_FRAMES, JitterBuffer
from broadcast_filter.media.srt_bridge import require_srt_tools
from broadcast_filter.media.supervisor import Supervisor

SECRET_PARAMS = frozenset(
    {"passphrase", "streamid", "key", "token", "password", "pass", "secret", "auth", "sig"}
)
_URL_IN_TEXT = re.compile(r"\b(?:rtmps?|rtmpt|srt|udp)://[^\s'\"]+")


def mask_url(url: str) -> str:
    """Hide secrets in a stream URL: the RTMP key (path after the app), passwords, and
    query values such as ``passphrase`` or ``streamid``. ``rtmp://h/live/abc`` -> ``rtmp://h/live/****``.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:****@{host}" if ":" in user else netloc
    path = parts.path
    if parts.scheme.startswith("rtmp"):
        segments = path.split("/")  # "", app, key...
        if len(segments) > 2:
            path = "/".join([*segments[:2], "****"])
    query = "&".join(
        f"{k}=****" if k.lower() in SECRET_PARAMS else (f"{k}={v}" if v else k)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, path, query, parts.fragment))


def mask_urls_in(text: str) -> str:
    """Apply :func:`mask_url` to every stream URL inside free text (errors, child stderr)."""
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


def _query(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((*parts[:3], "", "")), params


def _with_query(base: str, params: dict[str, str]) -> str:
    return f"{base}?{urlencode(params)}" if params else base


class NetworkSource(Source):
    """A live network stream decoded in an ingest process.

    ``frames()`` raises :class:`SourceLost` when a stream that was live drops; the process
    keeps re-opening in the background, so calling ``frames()`` again picks up the returning
    publisher. ``state`` says what is happening ("waiting for publisher", "live",
    "lost (...), retrying in 2s") and how many frames were dropped. Frames keep the native
    size of the stream; ``captured_at`` is the time the stream's timestamps say they were
    captured, anchored on the earliest-arriving frame
    (:class:`~broadcast_filter.media.audio.MediaClock`), and audio
    chunks carry the same clock.

    What it promises: every frame the ingest process decodes is counted in ``received`` and
    handed to ``frames()`` in order, through a :class:`JitterBuffer` of ``jitter_frames``:
    a consumer that stalls for less than that many frames loses nothing; beyond it the
    oldest frames are dropped and counted in ``dropped`` (shown in ``state``).

    ``open_timeout`` bounds a pull's connect + probe (listeners wait without limit);
    ``read_timeout`` is how long silence counts as "publisher gone"; ``backoff`` is the
    (first, longest) delay between re-opens of a pull. ``low_delay`` (MPEG-TS only) takes
    each PES packet as one frame, 1 frame interval sooner; set it False for a sender that
    splits frames across PES packets.
    """

    #: FFmpeg demuxer for the stream
    container_format: ClassVar[str]
    carries_audio = True

    def __init__(
        self,
        url: str,
        *,
        open_timeout: float = 5.0,
        read_timeout: float = 2.0,
        backoff: tuple[float, float] = (0.5, 4.0),
        low_delay: bool = True,
        jitter_frames: int = JITTER_FRAMES,
    ) -> None:
        self.url = url
        self.label = mask_url(url)
        spec = self._ingest_spec(url) | {
            "low_delay": low_delay,
            "format": self.container_format,
            "label": self.label,
            "open_timeout": open_timeout,
            "read_timeout": read_timeout,
            "backoff": list(backoff),
        }
        self._buffer: JitterBuffer[Frame] = JitterBuffer(jitter_frames)
        self._state = "not started"
        self._was_live = False
        self._losses = 0
        self._lost = ""
        self.received = 0
        self._closed = threading.Event()
        self._supervisor = Supervisor(
            "broadcast_filter.media.ingest_process",
            spec,
            name=f"ingest {self.label}",
            on_message=self._on_message,
            on_exit=self._on_exit,
            mask=mask_urls_in,
        )
        self._started = False

    def _ingest_spec(self, url: str) -> dict[str, object]:
        raise NotImplementedError

    @property
    def state(self) -> str:
        """Human-readable connection state for the status line, with the drop count."""
        dropped = self.dropped
        return f"{self._state}, {dropped} dropped" if dropped else self._state

    @property
    def dropped(self) -> int:
        """Frames dropped because ``frames()`` fell more than the jitter buffer behind."""
        return self._buffer.dropped

    def frames(self) -> Iterator[Frame]:
        if self._closed.is_set():
            return
        if not self._started:
            self._started = True
            self._supervisor.start()
        losses = self._losses
        while not self._closed.is_set():
            frame = self._buffer.take(timeout=0.5)
            if frame is not None:
                yield frame
            elif self._losses != losses:
                raise SourceLost(f"{self.label}: {self._lost}")

    def _on_message(self, message: wire.Message) -> None:
        if message.kind == wire.FRAME:
            assert isinstance(message.payload, np.ndarray)
            self.received += 1
            self._buffer.put(Frame(message.payload, message.t, message.n))
        elif message.kind == wire.AUDIO:
            assert isinstance(message.payload, np.ndarray)
            self._emit_audio(AudioChunk(message.payload, message.t, message.n))
        elif message.kind == wire.CODED:
            self._emit_coded(wire.coded_of(message))
        elif message.kind == wire.STATE and message.a == wire.AUDIO_STATE:
            self.audio_state = message.text
        elif message.kind == wire.STATE:
            self._state = message.text
            if message.a == wire.LIVE:
                self._was_live = True
            elif message.a == wire.LOST and self._was_live:
                self._lose(message.text)

    def _on_exit(self, why: str) -> None:
        self._state = why
        if self._was_live:
            self._lose(why)

    def _lose(self, why: str) -> None:
        self._was_live, self._lost = False, why
        self._losses += 1

    def close(self) -> None:
        self._closed.set()
        self._buffer.close()
        if self._started:
            self._supervisor.stop()
        self._state = "closed"


class RtmpSource(NetworkSource):
    """RTMP ingest: ``rtmp://HOST:PORT/APP/KEY?listen=1`` (be the server) or pull from one."""

    kind = "rtmp"
    container_format = "flv"

    def _ingest_spec(self, url: str) -> dict[str, object]:
        base, params = _query(url)
        listen = params.pop("listen", "0") not in ("0", "")
        if listen and urlsplit(base).port is None:
            base = base.replace(urlsplit(base).netloc, f"{urlsplit(base).netloc}:1935", 1)
        return {"url": _with_query(base, params), "listen": listen}


class UdpSource(NetworkSource):
    """MPEG-TS over UDP: ``udp://HOST:PORT`` binds HOST:PORT (local address or multicast group)."""

    kind = "udp"
    container_format = "mpegts"

    def _ingest_spec(self, url: str) -> dict[str, object]:
        base, params = _query(url)
        params = {"overrun_nonfatal": "1", "fifo_size": "50000"} | params
        return {"url": _with_query(base, params), "listen": True}


class SrtSource(NetworkSource):
    """SRT ingest via an ``srt-live-transmit`` bridge to loopback UDP (see the module doc)."""

    kind = "srt"
    container_format = "mpegts"

    def _ingest_spec(self, url: str) -> dict[str, object]:
        require_srt_tools()
        return {"url": "", "listen": True, "srt": url}


#: what waits for the egress process: samples, on air at, rate, the source's frames within
Audio = tuple[np.ndarray, float, int, list[tuple[CodedAudio, float]]]


class NetworkSink(Sink):
    """H.264 network output encoded and sent by an egress process; ``send()`` never blocks.

    ``bitrate`` (bits/s) is also the max rate and the 1-second VBV buffer (constant-ish
    bitrate for live ingest); ``keyframe_interval`` is in seconds. ``state`` says
    "connecting", "live" or "lost (...), retrying in 2s", and how many frames were dropped.
    ``audio="aac"`` adds an AAC track (``audio_bitrate`` bits/s) fed by :meth:`send_audio`
    (the daemon asks for it when its source may carry sound); audio waits in a queue of its
    own, so a dropped video frame never takes sound with it. The track opens in
    ``audio_format`` (``(rate, channels)``, the source's where known, else 48 kHz stereo);
    when the source's audio comes in another format (a publisher that arrives later), the
    egress process connects again in that one, so the output keeps the source's format.

    What it promises: every frame given to ``send()`` reaches the encoder in order unless
    the pipe or the encoder stalls for longer than ``jitter_frames`` frames (a
    :class:`JitterBuffer` on each side of the pipe); then the oldest frames are dropped and
    counted in ``dropped``. While the connection is down frames are dropped the same way.
    """

    container_format: ClassVar[str]

    def __init__(
        self,
        url: str,
        *,
        width: int,
        height: int,
        fps: float,
        bitrate: int = 2_500_000,
        keyframe_interval: float = 1.0,
        preset: str = "ultrafast",
        backoff: tuple[float, float] = (0.5, 4.0),
        jitter_frames: int = JITTER_FRAMES,
        audio: str = "off",
        audio_bitrate: int = AUDIO_BITRATE,
        audio_format: tuple[int, int] = (RATE, CHANNELS),
    ) -> None:
        super().__init__(width=width, height=height, fps=fps)
        self.url = url
        self.label = mask_url(url)
        self.audio = audio_track(audio, self.label)
        spec = self._egress_spec(url) | {
            "format": self.container_format,
            "label": self.label,
            "width": width,
            "height": height,
            "fps": fps,
            "bitrate": int(bitrate),
            "gop": max(1, round(keyframe_interval * fps)),
            "preset": preset,
            "backoff": list(backoff),
            "jitter_frames": jitter_frames,
            "audio": self.audio,
            "audio_bitrate": int(audio_bitrate),
            "audio_rate": int(audio_format[0]),
            "audio_channels": int(audio_format[1]),
        }
        self._buffer: JitterBuffer[tuple[np.ndarray, float]] = JitterBuffer(jitter_frames)
        self._audio: JitterBuffer[Audio] = JitterBuffer(AUDIO_QUEUE)
        self._audio_state = ""  # what the egress process says of a copied track
        self._state = "connecting"
        self._child_dropped = 0
        self._dropped_before = 0  # by egress processes that have exited
        self._supervisor = Supervisor(
            "broadcast_filter.media.egress_process",
            spec,
            name=f"egress {self.label}",
            on_message=self._on_message,
            on_exit=self._on_exit,
            mask=mask_urls_in,
            feed=self._feed,
        )
        self._supervisor.start()

    def _egress_spec(self, url: str) -> dict[str, object]:
        raise NotImplementedError

    @property
    def state(self) -> str:
        """``live``, ``live, audio aac 48k stereo`` (with an audio track; ``audio copy
        44.1k mono, copying the source's AAC``), and the frames it dropped."""
        state = f"{self._state}, audio {self.audio}" if self.audio else self._state
        if self.audio and self._audio_state:
            state += f" {self._audio_state}"
        dropped = self.dropped
        return f"{state}, {dropped} dropped" if dropped else state

    @property
    def dropped(self) -> int:
        """Frames dropped on the way to the encoder (see the class docstring)."""
        return self._buffer.dropped + self._dropped_before + self._child_dropped

    def send(self, image: np.ndarray, at: float | None = None) -> None:
        self.check(image)
        self._buffer.put((image.copy(), time.monotonic() if at is None else at))

    def send_audio(
        self,
        samples: np.ndarray,
        at: float,
        rate: int = RATE,
        coded: Sequence[tuple[CodedAudio, float]] = (),
    ) -> None:
        self._audio.put((samples, at, rate, list(coded)))

    def _feed(self, stdin: BinaryIO, alive: Callable[[], bool]) -> bool:
        """Write frames (and the audio that came with them) to one egress process: True once
        closed and drained, False if it died."""
        try:
            while alive():
                item = self._buffer.take(timeout=0.5)
                if item is None and self._buffer.closed:
                    return True
                if item is not None:
                    wire.write_frame(stdin, item[0], item[1], 0)
                while (chunk := self._audio.take(timeout=0)) is not None:
                    samples, at, rate, coded = chunk
                    for frame, on_air in coded:  # first: the track takes them before the PCM
                        wire.write_coded(stdin, frame, on_air)
                    wire.write_audio(stdin, samples, at, rate)
        except (OSError, ValueError):
            pass
        return False

    def _on_message(self, message: wire.Message) -> None:
        if message.kind == wire.STATE and message.a == wire.AUDIO_STATE:
            self._audio_state = message.text
        elif message.kind == wire.STATE:
            self._state = message.text
        elif message.kind == wire.DROPS:
            self._child_dropped = message.a

    def _on_exit(self, why: str) -> None:
        self._state = why
        self._dropped_before += self._child_dropped
        self._child_dropped = 0

    def close(self) -> None:
        self._buffer.close()
        self._supervisor.stop(wait=8)
        self._state = "closed"


class RtmpSink(NetworkSink):
    """Publish FLV/H.264 to ``rtmp://HOST:PORT/APP/KEY``."""

    kind = "rtmp"
    container_format = "flv"

    def _egress_spec(self, url: str) -> dict[str, object]:
        return {"url": url}


class UdpSink(NetworkSink):
    """Send MPEG-TS/H.264 to ``udp://HOST:PORT`` in 1316-byte datagrams."""

    kind = "udp"
    container_format = "mpegts"

    def _egress_spec(self, url: str) -> dict[str, object]:
        base, params = _query(url)
        return {"url": _with_query(base, {"pkt_size": "1316"} | params)}


class SrtSink(NetworkSink):
    """MPEG-TS/H.264 over SRT via an ``srt-live-transmit`` bridge (see the module doc)."""

    kind = "srt"
    container_format = "mpegts"

    def _egress_spec(self, url: str) -> dict[str, object]:
        require_srt_tools()
        return {"url": "", "srt": url}


for _source in (RtmpSource, UdpSource, SrtSource):
    register_source(_source.kind, _source)
for _sink in (RtmpSink, UdpSink, SrtSink):
    register_sink(_sink.kind, _sink)
