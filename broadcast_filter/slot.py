"""A latest-value slot: the one buffer between threads, in the daemon and in its I/O processes.

A writer never waits: a value that was not taken before the next ``put`` is replaced and
counted in :attr:`LatestSlot.dropped`, so a slow reader costs frames, never memory or delay.

What ``close`` does to a value still waiting is a choice made at construction:

* ``drain=False`` (the runtime's threads): closing means "stop now"; ``take`` returns
  ``None`` at once, even when a value is waiting.
* ``drain=True`` (an egress process's writer): closing means "no more values"; the value put
  last is still handed out, so the final frame reaches the encoder before it is flushed.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Holds one value, the newest. ``take`` consumes it; ``peek`` reads it without consuming."""

    def __init__(self, *, drain: bool = False) -> None:
        self._cond = threading.Condition()
        self._drain = drain
        self._value: T | None = None
        self._version = 0
        self._taken = 0
        self._closed = False
        self.dropped = 0

    def put(self, value: T) -> None:
        """Store ``value``, replacing (and counting) an unread one; never blocks for long."""
        with self._cond:
            if self._version != self._taken:
                self.dropped += 1
            self._value = value
            self._version += 1
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> T | None:
        """Wait for a value not taken yet; ``None`` on timeout or when closed (see ``drain``)."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._version != self._taken, timeout)
            waiting = self._version != self._taken
            if not waiting or (self._closed and not self._drain):
                return None
            self._taken = self._version
            return self._value

    def peek(self) -> tuple[T | None, int]:
        """The newest value put and its version (0 before the first ``put``); consumes nothing."""
        with self._cond:
            return self._value, self._version

    def wait_first(self, timeout: float | None = None) -> bool:
        """Wait until something was put; False on timeout or when closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._version > 0, timeout)
            return self._version > 0 and not self._closed

    def wait_closed(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking early when closed; return ``closed``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed, timeout)

    @property
    def pending(self) -> bool:
        """Whether a value is waiting to be taken."""
        with self._cond:
            return self._version != self._taken

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def close(self) -> None:
        """Wake every waiter; later waits return at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
