"""Process and pipe helpers for the I/O processes, Linux extras behind one platform check.

On Linux three calls make the I/O plumbing tighter: ``fcntl(F_SETPIPE_SZ)`` gives a pipe
1 MiB so a frame crosses in a few syscalls, ``prctl(PR_SET_PDEATHSIG)`` kills an I/O process
the moment the daemon dies (even one stuck inside FFmpeg), and ``setpriv --pdeathsig`` does
the same for the ``srt-live-transmit`` bridge an I/O process starts. None exists on Windows
or macOS, so each has a portable fallback that always runs:

* pipes keep the system's default size (64 KiB): frames cross in more syscalls, nothing else;
* an I/O process treats end of stdin as "the daemon is gone" (:func:`exit_when_stdin_closes`
  for the ingest process; the egress process ends at end of stdin anyway), and stops its
  bridge before it exits (SIGTERM, a normal exit and the stdin watch all do);
* the bridge runs under a small watcher (``python -m broadcast_filter.media.portable --
  ARGV``) whose stdin is a pipe from the I/O process: when that closes, because the I/O
  process exited or was killed (even SIGKILL), the watcher stops the bridge and exits.

``BROADCAST_FILTER_NO_LINUX_EXTRAS=1`` in the environment switches the Linux extras off (the
tests run the network source and sink that way); children inherit it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO

PIPE_BYTES = 1 << 20
NO_LINUX_EXTRAS = "BROADCAST_FILTER_NO_LINUX_EXTRAS"


def linux_extras() -> bool:
    """Whether the Linux-only calls are used: on Linux, unless switched off."""
    return sys.platform == "linux" and os.environ.get(NO_LINUX_EXTRAS, "") in ("", "0")


def grow_pipe(fd: int) -> None:
    """Give a pipe 1 MiB of buffer on Linux (best effort); elsewhere keep the default."""
    if linux_extras():
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def die_with_parent() -> None:
    """On Linux, have the kernel SIGKILL this process when its parent exits (PDEATHSIG)."""
    if linux_extras():
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def exit_when_stdin_closes(inp: BinaryIO, cleanup: Callable[[], None]) -> threading.Thread:
    """Watch ``inp`` on a thread: at end of stream (the parent died or closed it) run
    ``cleanup`` and exit the process at once. For a process that reads nothing more on stdin."""

    def watch() -> None:
        with contextlib.suppress(OSError, ValueError):
            while inp.read(4096):
                pass
        try:
            cleanup()
        finally:
            os._exit(0)

    thread = threading.Thread(target=watch, name="stdin watch", daemon=True)
    thread.start()
    return thread


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so ``finally`` blocks (stopping the bridge) run."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def bridge_argv(argv: list[str]) -> list[str]:
    """``argv`` for a helper of an I/O process, which must be started with ``stdin=PIPE``
    (and the pipe kept open): it dies with the I/O process. On Linux through ``setpriv
    --pdeathsig``; elsewhere (or with the extras off) through the stdin watcher."""
    if linux_extras() and shutil.which("setpriv"):
        return ["setpriv", "--pdeathsig", "KILL", "--", *argv]
    return [sys.executable, "-m", "broadcast_filter.media.portable", "--", *argv]


def watch(argv: list[str]) -> int:
    """Run ``argv`` until it exits, or until our stdin ends or SIGTERM comes: then stop it
    (by PID) and return. Our exit status is the helper's."""
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    def until_stdin_closes() -> None:
        with contextlib.suppress(OSError, ValueError):
            while sys.stdin.buffer.read(4096):
                pass
        stop_process(child)

    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    threading.Thread(target=until_stdin_closes, name="stdin watch", daemon=True).start()
    code = child.wait()
    return code if code >= 0 else 128 - code


def stop_process(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """Stop a child by its PID: terminate, then kill after ``grace`` seconds; always reap it."""
    for stop in (proc.terminate, proc.kill):
        if proc.poll() is not None:
            return
        try:
            stop()
            proc.wait(grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


if __name__ == "__main__":
    sys.exit(watch(sys.argv[sys.argv.index("--") + 1 :]))
