"""Plumbing shared by the network sources and sinks and their I/O processes.

* :class:`LatestSlot` — a one-slot mailbox: ``put`` replaces what is there, ``take`` waits for
  something newer. It gives "latest frame wins" hand-offs that never grow a queue.
* The pipe wire format between the daemon and an ingest/egress process: a fixed header
  (:data:`HEADER`) then a payload. Frames are raw RGB; states are UTF-8 text.
* :func:`die_with_parent` so an I/O process (and its own helpers) never outlives the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass
from typing import BinaryIO, Generic, TypeVar

import numpy as np

T = TypeVar("T")

#: kind, a, b, time, n — a frame is (FRAME, height, width, captured_at, index) + H*W*3 bytes;
#: a state is (STATE, code, len(text), time, 0) + text; a spec is (SPEC, 0, len, 0, 0) + JSON.
HEADER = struct.Struct("<IIIdQ")
#: a drop count is (DROPS, count, 0, 0, 0) with no payload.
FRAME, STATE, SPEC, DROPS = 1, 2, 3, 4

#: state codes an I/O process reports
CONNECTING, LIVE, LOST = 0, 1, 2

PIPE_BYTES = 1 << 20


class LatestSlot(Generic[T]):
    """Holds at most one item; a newer ``put`` replaces an unread one (counted in ``dropped``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._closed = False
        self.dropped = 0

    def put(self, item: T) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> T | None:
        """Wait for an item and remove it; ``None`` on timeout or once closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_closed(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking early when closed; return ``closed``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed, timeout)


@dataclass(frozen=True)
class Message:
    kind: int
    a: int
    b: int
    t: float
    n: int
    payload: bytes | np.ndarray

    @property
    def text(self) -> str:
        assert isinstance(self.payload, bytes)
        return self.payload.decode("utf-8", "replace")


def write_frame(out: BinaryIO, image: np.ndarray, captured_at: float, index: int) -> None:
    height, width = image.shape[:2]
    out.write(HEADER.pack(FRAME, height, width, captured_at, index))
    out.write(memoryview(np.ascontiguousarray(image)).cast("B"))
    out.flush()


def write_text(out: BinaryIO, kind: int, code: int, text: str, t: float = 0.0) -> None:
    data = text.encode("utf-8")
    out.write(HEADER.pack(kind, code, len(data), t, 0))
    out.write(data)
    out.flush()


def write_spec(out: BinaryIO, spec: dict[str, object]) -> None:
    """Send the process its settings on stdin (never on argv, where ``ps`` would show keys)."""
    write_text(out, SPEC, 0, json.dumps(spec))


def read_spec(inp: BinaryIO) -> dict[str, object]:
    message = read_message(inp)
    if message is None or message.kind != SPEC:
        raise SystemExit("expected a settings message on stdin")
    return json.loads(message.text)


def read_message(inp: BinaryIO) -> Message | None:
    """Read one message; ``None`` at end of stream."""
    header = _read_exact(inp, HEADER.size)
    if header is None:
        return None
    kind, a, b, t, n = HEADER.unpack(header)
    if kind == FRAME:
        image = np.empty((a, b, 3), np.uint8)
        if not _read_into(inp, memoryview(image).cast("B")):
            return None
        return Message(kind, a, b, t, n, image)
    payload = _read_exact(inp, b)
    return None if payload is None else Message(kind, a, b, t, n, payload)


def _read_exact(inp: BinaryIO, size: int) -> bytes | None:
    buf = bytearray(size)
    return bytes(buf) if _read_into(inp, memoryview(buf)) else None


def _read_into(inp: BinaryIO, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = inp.readinto(view[got:])
        if not n:
            return False
        got += n
    return True


def grow_pipe(fd: int) -> None:
    """Give a pipe 1 MiB of buffer so a frame crosses in a few syscalls (best effort)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits (prctl PDEATHSIG)."""
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)


def stop_process(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """Stop a child by its PID: SIGTERM, then SIGKILL after ``grace`` seconds; always reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, sig)
            proc.wait(grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def free_udp_port() -> int:
    """A loopback UDP port that was free a moment ago (for a private bridge hop)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_srt_bridge(srt_url: str, udp_port: int, *, inbound: bool) -> subprocess.Popen[bytes]:
    """Run ``srt-live-transmit`` between ``srt_url`` and loopback UDP ``udp_port``.

    Inbound: SRT -> ``udp://127.0.0.1:PORT`` (the ingest process reads it with PyAV).
    Outbound: ``udp://:PORT`` (the egress process writes MPEG-TS there) -> SRT.
    It reconnects by itself (``-a:yes``), shares the I/O process's stderr, and
    ``setpriv --pdeathsig`` (util-linux) makes it die with the I/O process that started it.
    """
    udp = f"udp://127.0.0.1:{udp_port}" if inbound else f"udp://:{udp_port}"
    argv = ["srt-live-transmit", "-q", "-a:yes", *((srt_url, udp) if inbound else (udp, srt_url))]
    if shutil.which("setpriv"):
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
