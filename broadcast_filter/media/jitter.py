"""A short FIFO that absorbs brief stalls of its reader; beyond its capacity the oldest goes.

Between a frame producer and a consumer that usually keeps up (the egress pipe, the network
source's hand-off) a single latest-value slot loses a frame at every short stall of the
consumer: a busy CPU is enough. This buffer holds up to ``capacity`` items in order, so a
stall shorter than ``capacity`` frame intervals loses nothing; when it is full the oldest
item is dropped and counted in :attr:`JitterBuffer.dropped`, so the delay it can add stays
bounded by ``capacity`` frames. ``close`` means "no more items": what is queued is still
handed out, then ``take`` returns ``None``.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")

#: frames a jitter buffer holds: 8 frames is 0.27 s at 30 fps (0.13 s at 60)
JITTER_FRAMES = 8


class JitterBuffer(Generic[T]):
    """Up to ``capacity`` items, first in first out; a full buffer drops its oldest on ``put``."""

    def __init__(self, capacity: int = JITTER_FRAMES) -> None:
        if capacity < 1:
            raise ValueError(f"a jitter buffer holds at least 1 item, got {capacity}")
        self.capacity = capacity
        self._cond = threading.Condition()
        self._items: deque[T] = deque()
        self._closed = False
        self.dropped = 0
        self.passed = 0

    def put(self, item: T) -> None:
        """Append ``item``; never waits. Dropping the oldest when full is counted."""
        with self._cond:
            if len(self._items) == self.capacity:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> T | None:
        """The oldest item; ``None`` on timeout, or once closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed, timeout)
            if not self._items:
                return None
            self.passed += 1
            return self._items.popleft()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def wait_closed(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking early when closed; return ``closed``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed, timeout)

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
