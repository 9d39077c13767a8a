"""Network sources and sinks: RTMP, UDP/MPEG-TS and SRT, each run in its own I/O process.

Why a process: PyAV holds the GIL while it blocks inside FFmpeg (an RTMP listener waiting
for a publisher, a lazy RTMP connect at the first mux), which would freeze every thread of
the daemon. So each source runs ``python -m broadcast_filter.media.ingest_process`` and each
sink ``python -m broadcast_filter.media.egress_process``; frames cross a pipe (raw RGB), the
newest frame wins on both sides, and the process re-opens the stream by itself with backoff.

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

A sink never blocks ``send()``: it copies the frame into a one-slot hand-off; a worker thread
feeds the egress process, which connects, encodes and retries. Stream keys and passphrases
are masked (:func:`mask_url`) in every state string, log line and exception.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from broadcast_filter.media import handoff
from broadcast_filter.media.base import (
    Frame,
    MediaError,
    Sink,
    Source,
    SourceLost,
    register_sink,
    register_source,
)

log = logging.getLogger(__name__)

SECRET_PARAMS = frozenset(
    {"passphrase", "streamid", "key", "token", "password", "pass", "secret", "auth", "sig"}
)
_URL_IN_TEXT = re.compile(r"\b(?:rtmps?|rtmpt|srt|udp)://[^\s'\"]+")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


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


class _IOProcess:
    """One I/O child: started with its settings on stdin, stderr kept in a temp file, and
    stopped by PID. It dies with the daemon (PDEATHSIG) if the daemon is killed."""

    def __init__(self, module: str, spec: dict[str, object]) -> None:
        self.module, self.spec = module, spec
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: BinaryIO | None = None

    def start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            bufsize=-1,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        handoff.grow_pipe(self.proc.stdin.fileno())
        handoff.grow_pipe(self.proc.stdout.fileno())
        handoff.write_spec(self.proc.stdin, self.spec)
        return self.proc

    def error_tail(self) -> str:
        """The last line the process wrote to stderr, with URLs masked."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, self._stderr.tell() - 2000))
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return mask_urls_in(lines[-1]) if lines else ""

    def stop(self) -> None:
        """Stop by PID first: that unblocks our threads reading or writing its pipes."""
        if self.proc is not None:
            handoff.stop_process(self.proc)
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


class NetworkSource(Source):
    """A live network stream decoded in an ingest process; yields the newest frame.

    ``frames()`` raises :class:`SourceLost` when a stream that was live drops; the process
    keeps re-opening in the background, so calling ``frames()`` again picks up the returning
    publisher. ``state`` says what is happening ("waiting for publisher", "live",
    "lost (...), retrying in 2s"). Frames keep the native size of the stream; ``captured_at``
    is when the ingest process decoded them.

    ``open_timeout`` bounds a pull's connect + probe (listeners wait without limit);
    ``read_timeout`` is how long silence counts as "publisher gone"; ``backoff`` is the
    (first, longest) delay between re-opens of a pull. ``low_delay`` (MPEG-TS only) takes
    each PES packet as one frame, 1 frame interval sooner; set it False for a sender that
    splits frames across PES packets.
    """

    #: FFmpeg demuxer for the stream
    container_format: ClassVar[str]

    def __init__(
        self,
        url: str,
        *,
        open_timeout: float = 5.0,
        read_timeout: float = 2.0,
        backoff: tuple[float, float] = (0.5, 4.0),
        low_delay: bool = True,
    ) -> None:
        self.url = url
        self.label = mask_url(url)
        self.spec = self._ingest_spec(url) | {
            "low_delay": low_delay,
            "format": self.container_format,
            "label": self.label,
            "open_timeout": open_timeout,
            "read_timeout": read_timeout,
            "backoff": list(backoff),
        }
        self._slot: handoff.LatestSlot[Frame] = handoff.LatestSlot()
        self._state = "not started"
        self._losses = 0
        self._lost = ""
        self._child: _IOProcess | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def _ingest_spec(self, url: str) -> dict[str, object]:
        raise NotImplementedError

    @property
    def state(self) -> str:
        """Human-readable connection state for the status line."""
        return self._state

    @property
    def dropped(self) -> int:
        """Frames replaced before ``frames()`` took them (the consumer was slower)."""
        return self._slot.dropped

    def frames(self) -> Iterator[Frame]:
        if self._closed.is_set():
            return
        self._start()
        losses = self._losses
        while not self._closed.is_set():
            frame = self._slot.take(timeout=0.5)
            if self._losses != losses:
                raise SourceLost(f"{self.label}: {self._lost}")
            if frame is not None:
                yield frame

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._pump, name=f"ingest {self.label}", daemon=True
            )
            self._thread.start()

    def _pump(self) -> None:
        """Run the ingest process and move its messages into the slot; restart it if it dies."""
        restart_delay = 1.0
        while not self._closed.is_set():
            self._child = _IOProcess("broadcast_filter.media.ingest_process", self.spec)
            proc = self._child.start()
            assert proc.stdout is not None
            was_live = False
            try:
                while (message := handoff.read_message(proc.stdout)) is not None:
                    if message.kind == handoff.FRAME:
                        assert isinstance(message.payload, np.ndarray)
                        self._slot.put(Frame(message.payload, message.t, message.n))
                    elif message.kind == handoff.STATE:
                        self._state = message.text
                        if message.a == handoff.LIVE:
                            was_live = True
                        elif message.a == handoff.LOST and was_live:
                            was_live, self._lost = False, message.text
                            self._losses += 1
            except (OSError, ValueError):
                pass  # pipe closed by close()
            if self._closed.is_set():
                break
            proc.wait()
            self._state = (
                f"ingest process exited ({proc.returncode}): {self._child.error_tail()}; "
                f"restarting in {restart_delay:g}s"
            )
            log.warning("%s: %s", self.label, self._state)
            if was_live:
                self._lost = self._state
                self._losses += 1
            self._child.stop()
            self._closed.wait(restart_delay)
            restart_delay = min(restart_delay * 2, 30.0)

    def close(self) -> None:
        self._closed.set()
        self._slot.close()
        if self._child is not None:
            self._child.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
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

    @classmethod
    def is_available(cls) -> bool:
        return shutil.which("srt-live-transmit") is not None

    def _ingest_spec(self, url: str) -> dict[str, object]:
        _require_srt_tools()
        return {"url": "", "listen": True, "srt": url}


def _require_srt_tools() -> None:
    if shutil.which("srt-live-transmit") is None:
        raise MediaError(
            "SRT needs the srt-live-transmit tool (PyAV has no SRT protocol): "
            "install it with 'apt-get install srt-tools' (Debian/Ubuntu)"
        )


class NetworkSink(Sink):
    """H.264 network output encoded and sent by an egress process; ``send()`` never blocks.

    ``bitrate`` (bits/s) is also the max rate and the 1-second VBV buffer (constant-ish
    bitrate for live ingest); ``keyframe_interval`` is in seconds. ``state`` says
    "connecting", "live" or "lost (...), retrying in 2s".
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
    ) -> None:
        super().__init__(width=width, height=height, fps=fps)
        self.url = url
        self.label = mask_url(url)
        self.spec = self._egress_spec(url) | {
            "format": self.container_format,
            "label": self.label,
            "width": width,
            "height": height,
            "fps": fps,
            "bitrate": int(bitrate),
            "gop": max(1, round(keyframe_interval * fps)),
            "preset": preset,
            "backoff": list(backoff),
        }
        self._slot: handoff.LatestSlot[tuple[np.ndarray, float]] = handoff.LatestSlot()
        self._state = "connecting"
        self._child_dropped = 0
        self._child: _IOProcess | None = None
        self._status_thread: threading.Thread | None = None
        self._writer = threading.Thread(target=self._feed, name=f"egress {self.label}", daemon=True)
        self._writer.start()

    def _egress_spec(self, url: str) -> dict[str, object]:
        raise NotImplementedError

    @property
    def state(self) -> str:
        return self._state

    @property
    def dropped(self) -> int:
        """Frames replaced before the encoder took them (it was slower than ``send()``)."""
        return self._slot.dropped + self._child_dropped

    def send(self, image: np.ndarray) -> None:
        if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"{self.label}: expected a ({self.height}, {self.width}, 3) uint8 frame, "
                f"got {image.shape} {image.dtype}"
            )
        self._slot.put((image.copy(), time.monotonic()))

    def _feed(self) -> None:
        """Write the newest frame to the egress process; restart the process if it died."""
        restart_delay = 1.0
        while not self._slot.closed:
            self._child = _IOProcess("broadcast_filter.media.egress_process", self.spec)
            proc = self._child.start()
            self._status_thread = threading.Thread(
                target=self._read_status, args=(proc,), daemon=True
            )
            self._status_thread.start()
            assert proc.stdin is not None
            try:
                while (item := self._slot.take()) is not None:
                    handoff.write_frame(proc.stdin, item[0], item[1], 0)
                proc.stdin.close()  # end of stream: the process flushes and exits
                proc.wait(timeout=5)
                return
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            if self._slot.closed:
                return
            proc.wait()
            self._state = (
                f"egress process exited ({proc.returncode}): {self._child.error_tail()}; "
                f"restarting in {restart_delay:g}s"
            )
            log.warning("%s: %s", self.label, self._state)
            self._child.stop()
            self._slot.wait_closed(restart_delay)
            restart_delay = min(restart_delay * 2, 30.0)

    def _read_status(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        try:
            while (message := handoff.read_message(proc.stdout)) is not None:
                if message.kind == handoff.STATE:
                    self._state = message.text
                elif message.kind == handoff.DROPS:
                    self._child_dropped = message.a
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self._slot.close()
        self._writer.join(timeout=8)
        if self._child is not None:
            self._child.stop()
        if self._status_thread is not None:
            self._status_thread.join(timeout=2)
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

    @classmethod
    def is_available(cls) -> bool:
        return shutil.which("srt-live-transmit") is not None

    def _egress_spec(self, url: str) -> dict[str, object]:
        _require_srt_tools()
        return {"url": "", "srt": url}


for _source in (RtmpSource, UdpSource, SrtSource):
    register_source(_source.kind, _source)
for _sink in (RtmpSink, UdpSink, SrtSink):
    register_sink(_sink.kind, _sink)
