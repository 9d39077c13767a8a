"""A latest-value slot: the only buffer between the runtime's threads.

A writer never waits: a value that was not taken before the next ``put`` is replaced and
counted in :attr:`LatestSlot.dropped`. So a slow reader costs frames, never memory or delay.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Holds one value, the newest. ``take`` consumes it; ``peek`` reads it without consuming."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
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
        """Wait for a value not taken yet; ``None`` on timeout or when closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._version != self._taken, timeout)
            if self._closed or self._version == self._taken:
                return None
            self._taken = self._version
            return self._value

    def peek(self) -> tuple[T | None, int]:
        """The newest value and its version (0 before the first ``put``); consumes nothing."""
        with self._cond:
            return self._value, self._version

    def wait_first(self, timeout: float | None = None) -> bool:
        """Wait until something was put; False on timeout or when closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._version > 0, timeout)
            return self._version > 0 and not self._closed

    @property
    def pending(self) -> bool:
        """Whether a value is waiting to be taken."""
        with self._cond:
            return self._version != self._taken

    def close(self) -> None:
        """Wake every waiter; later waits return at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
