"""What the daemon put on air, logged inside it, to hold each recording of it against.

How far a flash and its beep leave apart depends on the machine: on a loaded 2-core CPU a
frame may wait a model call longer than the lasting delay the audio is held by. What the
design guarantees whatever the speed is that every output carries the offsets the daemon
emitted: the video and the audio each stamped with its on-air time, on one clock. So the
tests log, inside the running daemon, the on-air time each sink was given each picture with
(its brightness) and when each audio chunk goes on air (its samples), find the flash/beep
pairs in that log as :mod:`sync_pattern` finds them in a recording, and compare the two.

The log wraps the sinks' ``send`` and the group's ``send_audio`` (a spy: it passes every
call on unchanged); the daemon itself is the real one.
"""

from __future__ import annotations

import statistics
import threading
from typing import Any

import numpy as np
import sync_pattern

#: a recording's offset may differ from the emitted one by this much: onsets found in
#: AAC-coded audio (a coding delay of a few ms either way) and timestamps rounded to ms (FLV)
MATCH_S = 0.010
#: a recorded flash is where the daemon sent it, give or take this (the recording's clock
#: against the daemon's, timestamps rounded to ms)
FIT_S = 0.005


class OnAir:
    """The pictures and audio the daemon's sinks are given from the moment this is made."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self._lock = threading.Lock()
        self.video: dict[str, list[tuple[float, float]]] = {}  # sink -> (sent at, brightness)
        self.audio: list[tuple[float, np.ndarray]] = []  # (on air at, mono samples)
        self._sinks = dict(daemon.sinks.sinks)
        for name, sink in self._sinks.items():
            self.video[name] = []
            sink.send = self._spy(sink.send, self.video[name])
        group = daemon.sinks
        send_audio = group.send_audio

        def logged_audio(samples: np.ndarray, at: float, rate: int, coded, now: float) -> None:
            mono = samples[:, 0].copy()
            if rate != sync_pattern.RATE:  # the reader's rate (a beep's onset survives this)
                n = round(len(mono) * sync_pattern.RATE / rate)
                mono = np.interp(
                    np.arange(n) * rate / sync_pattern.RATE, np.arange(len(mono)), mono
                )
            with self._lock:
                self.audio.append((at, mono))
            send_audio(samples, at, rate, coded, now)

        group.send_audio = logged_audio

    def _spy(self, send: Any, log: list[tuple[float, float]]) -> Any:
        def logged(image: np.ndarray, at: float) -> None:
            with self._lock:  # ``at``: what the sink stamps the picture with
                log.append((at, float(image.mean())))
            send(image, at)

        return logged

    def sink(self, fragment: str) -> str:
        """The name of the one sink whose name contains ``fragment``."""
        (name,) = [n for n in self.video if fragment in n]
        return name

    def dropped(self, name: str) -> int:
        """Frames sink ``name`` dropped on the way to its encoder (counted under load)."""
        return getattr(self._sinks[name], "dropped", 0)

    def copies(self, name: str) -> bool:
        """Whether sink ``name`` copies the source's AAC frames (``audio: copy``)."""
        return getattr(self._sinks[name], "audio", "") == "copy"

    def first_sent(self, name: str) -> float:
        return self.video[name][0][0]

    def pairs(self, name: str) -> list[tuple[float, float]]:
        """(flash sent at, offset of its beep) for what sink ``name`` was given."""
        with self._lock:
            video, audio = list(self.video[name]), list(self.audio)
        flashes = sync_pattern.flash_onsets(video)
        beeps, _, _ = sync_pattern.beep_onsets(audio)
        return sync_pattern.pair(flashes, beeps)


def match(
    recorded: list[tuple[float, float]], emitted: list[tuple[float, float]], zero_at: float
) -> list[tuple[float, float]]:
    """(recorded offset, emitted offset) for each recorded pair: the recording's flashes
    are a run of the emitted ones, found by their spacing (a loaded machine makes it
    uneven). A run's misfit is how many of its flashes stray more than ``FIT_S`` from the
    run's median lag, so one flash shown a frame late does not shift the rest, and a run
    shifted by a flash (its spacing off by frames here and there) fits worse than the true
    one. Where the spacing cannot tell (it is even: passthrough), the run whose offsets the
    recording carries (within ``MATCH_S``), then the one nearest to where the recording
    started (``zero_at``: about the daemon's time at the recording's time 0; a recorder
    that is slow to start, on a loaded machine, makes that a second or more off). A
    recording whose offsets are wrong fits no run's, so the checks still see it."""
    rec = [f for f, _ in recorded]
    sent = [t for t, _ in emitted]
    n = len(rec)
    assert 0 < n <= len(sent), f"{n} flashes recorded, {len(sent)} sent"
    fits = []
    for s in range(len(sent) - n + 1):
        lags = [rec[i] - sent[s + i] for i in range(n)]
        lag = statistics.median(lags)
        strays = sum(abs(x - lag) > FIT_S for x in lags)
        off = sum(abs(m - emitted[s + i][1]) > MATCH_S for i, (_, m) in enumerate(recorded))
        fits.append((strays, off, abs(sent[s] - (zero_at + rec[0])), s))
    strays, _, _, shift = min(fits)
    assert 2 * strays < n, f"the recorded flashes are no run of the sent ones: {rec} vs {sent}"
    return [(m, emitted[shift + i][1]) for i, (_, m) in enumerate(recorded)]


def check_carried(
    recorded: list[tuple[float, float]],
    emitted: list[tuple[float, float]],
    zero_at: float,
    what: str,
    *,
    dropped: int = 0,
    within: float = MATCH_S,
    cuts: tuple[int, float] = (0, 0.0),
) -> list[float]:
    """Every recorded pair has the offset the daemon emitted (within ``within``). A sink
    that dropped frames (counted, under load) may show a flash a frame later than it was
    given it: its audio may be that much earlier, never later. ``cuts``: up to that many
    pairs may be off by that much more (a copied track is cut where the delay changes at a
    frame boundary, the emitted sound at the exact sample). Returns the offsets."""
    matched = match(recorded, emitted, zero_at)
    errors = ", ".join(f"{(m - e) * 1e3:+.0f}" for m, e in matched)
    print(
        f"{what}: recorded minus emitted offset, ms: [{errors}]"
        + (f"; sink dropped {dropped}" if dropped else "")
    )
    count, extra = cuts
    far = [(m, e) for m, e in matched if abs(m - e) > within]
    assert len(far) <= count, f"{what}: {len(far)} pairs off what was emitted: {matched}"
    for m, e in matched:
        assert m <= e + within + extra, f"{what}: audio later than emitted: {matched}"
        assert dropped or m >= e - within - extra, f"{what}: audio earlier than emitted: {matched}"
    return [m for m, _ in matched]
