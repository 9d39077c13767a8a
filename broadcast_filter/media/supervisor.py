"""One supervisor for the I/O processes: start one, talk to it, restart it when it dies.

An :class:`IOProcess` is one child (``python -m MODULE``) with its settings sent on stdin,
its stderr kept in a temp file for the error message, and a stop by PID. A
:class:`Supervisor` runs one on a thread, hands each message from its stdout to
``on_message``, optionally feeds its stdin with ``feed``, and when it exits unasked says so
(``on_exit``) and starts a fresh one after an exponential backoff.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from broadcast_filter.backoff import Backoff
from broadcast_filter.media import portable, wire

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

#: the first restart waits 1 s, later ones up to 30 s
RESTART_BACKOFF = (1.0, 30.0)


class IOProcess:
    """One I/O child: settings on stdin, stderr in a temp file, stopped by PID."""

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
        portable.grow_pipe(self.proc.stdin.fileno())
        portable.grow_pipe(self.proc.stdout.fileno())
        wire.write_spec(self.proc.stdin, self.spec)
        return self.proc

    def error_tail(self, mask: Callable[[str], str]) -> str:
        """The last line the process wrote to stderr, passed through ``mask``."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, self._stderr.tell() - 2000))
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return mask(lines[-1]) if lines else ""

    def stop(self) -> None:
        """Stop by PID first: that unblocks threads reading or writing its pipes."""
        if self.proc is not None:
            portable.stop_process(self.proc)
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


class Supervisor:
    """Keep one I/O process running until :meth:`stop`.

    ``on_message`` gets every message the process writes. ``feed``, when given, runs on the
    supervisor's thread as ``feed(stdin, alive)`` and returns True when it has finished for
    good (stdin is then closed: the process flushes and exits) or False when the process
    died (the pipe broke, or ``alive()``, "its stdout is still open", turned False).
    ``on_exit`` gets a line saying why the process is being restarted. ``mask`` hides secrets
    in what the process wrote to stderr.
    """

    def __init__(
        self,
        module: str,
        spec: dict[str, object],
        *,
        name: str,
        on_message: Callable[[wire.Message], None],
        on_exit: Callable[[str], None],
        mask: Callable[[str], str],
        feed: Callable[[BinaryIO, Callable[[], bool]], bool] | None = None,
    ) -> None:
        self.module, self.spec, self.name = module, spec, name
        self._on_message, self._on_exit, self._mask, self._feed = on_message, on_exit, mask, feed
        self._stopping = threading.Event()
        self._child: IOProcess | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.restarts = 0

    def start(self) -> None:
        self._thread.start()

    @property
    def pid(self) -> int | None:
        """The running process's PID (for tests and diagnostics)."""
        child = self._child
        return child.proc.pid if child is not None and child.proc is not None else None

    def _run(self) -> None:
        restart = Backoff(*RESTART_BACKOFF)
        while not self._stopping.is_set():
            child = self._child = IOProcess(self.module, self.spec)
            proc = child.start()
            if self._session(proc):
                return
            if self._stopping.is_set():
                break
            proc.wait()
            delay = restart.step()
            why = (
                f"{self.module.rpartition('.')[2].replace('_', ' ')} exited ({proc.returncode}): "
                f"{child.error_tail(self._mask)}; restarting in {delay:g}s"
            )
            log.warning("%s: %s", self.name, why)
            self._on_exit(why)
            child.stop()
            self.restarts += 1
            self._stopping.wait(delay)

    def _session(self, proc: subprocess.Popen[bytes]) -> bool:
        """Talk to one process until it ends; True when the feed finished for good."""
        assert proc.stdin is not None and proc.stdout is not None
        if self._feed is None:
            self._read(proc.stdout)
            return False
        reader = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        reader.start()
        finished = self._feed(proc.stdin, reader.is_alive)
        if finished:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # end of stream: the process flushes and exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        reader.join(timeout=2)
        return finished

    def _read(self, out: BinaryIO) -> None:
        with contextlib.suppress(OSError, ValueError):  # ValueError: pipe closed by stop()
            while (message := wire.read_message(out)) is not None:
                self._on_message(message)

    def stop(self, wait: float = 0.0) -> None:
        """Stop for good: give a feeding session ``wait`` seconds to flush, then stop by PID."""
        self._stopping.set()
        if wait and self._thread.is_alive():
            self._thread.join(wait)
        if self._child is not None:
            self._child.stop()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
