"""One model call for the frames of several streams, from their own engine threads.

Each stream keeps its engine thread (its own pacing, SSF, crossfades and failures) and hands
each pipeline step to :meth:`Batcher.drive`. Steps are run in rounds: a round takes every
step handed in so far and runs them side by side
(:func:`~broadcast_filter.diffusion.batch.drive_together`: one UNet call for all of them, per
group that can share a batch), so the streams stay in step with each other. A round starts
as soon as every stream of the previous round has handed in its next step, or when the
first step waited ``window_s``: a stream without a new frame (no input, SSF skip,
passthrough) holds the others up for one window at most, then is no longer waited for.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

import torch

from broadcast_filter.diffusion.batch import Step, drive_together


@dataclass
class _Ticket:
    step: Step
    thread: int
    done: bool = False
    result: torch.Tensor | BaseException | None = None


@dataclass(frozen=True)
class BatchStats:
    """Rounds run so far and the steps they held (several streams' frames per round)."""

    rounds: int = 0
    steps: int = 0

    @property
    def streams_per_round(self) -> float:
        return self.steps / self.rounds if self.rounds else 0.0


class Batcher:
    """The rendezvous of the streams' engine threads on shared models."""

    def __init__(self, window_s: float = 0.005) -> None:
        self.window_s = window_s
        self._cond = threading.Condition()
        self._pending: list[_Ticket] = []
        self._first_at = 0.0  # when the oldest pending step began to wait
        self._last_round: set[int] = set()  # engine threads of the last round
        self._running = False
        self._stats = BatchStats()

    @property
    def stats(self) -> BatchStats:
        with self._cond:
            return self._stats

    def drive(self, step: Step) -> torch.Tensor:
        """Run one pipeline step in the next round; its output, or its exception raised."""
        ticket = _Ticket(step, threading.get_ident())
        with self._cond:
            if not self._pending:
                self._first_at = time.monotonic()
            self._pending.append(ticket)
            self._cond.notify_all()
            while not ticket.done:
                if not self._running and self._ready(time.monotonic()):
                    batch, self._pending = self._pending, []
                    self._running = True
                    break
                wait = None if self._running else self._first_at + self.window_s - time.monotonic()
                self._cond.wait(None if wait is None else max(0.0, wait))
            else:
                return self._result(ticket)
        try:  # this thread runs the round; the others wait for their tickets
            outputs = drive_together([t.step for t in batch])
        except BaseException as exc:  # drive_together keeps step errors apart; this is worse
            outputs = [exc] * len(batch)
        with self._cond:
            for t, out in zip(batch, outputs, strict=True):
                t.done, t.result = True, out
            self._last_round = {t.thread for t in batch}
            self._first_at = time.monotonic()  # steps handed in meanwhile wait from now
            self._stats = replace(
                self._stats, rounds=self._stats.rounds + 1, steps=self._stats.steps + len(batch)
            )
            self._running = False
            self._cond.notify_all()
        return self._result(ticket)

    def _ready(self, now: float) -> bool:
        waiting = {t.thread for t in self._pending}
        return self._last_round <= waiting or now >= self._first_at + self.window_s

    @staticmethod
    def _result(ticket: _Ticket) -> torch.Tensor:
        if isinstance(ticket.result, BaseException):
            raise ticket.result
        return ticket.result
