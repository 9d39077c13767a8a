"""On-air safety as pure functions: what goes out when the engine or the source misbehaves.

The engine thread reports each call (:func:`engine_started`, :func:`engine_finished`); the
output thread asks :func:`on_air` once per tick what to send. The state is one small frozen
:class:`WatchState`; the thread-safe :class:`Watchdog` only holds it under a lock.

On air, in order of precedence:

* ``slate`` — no input for longer than ``hold_s`` (source lost): a "no signal" picture;
* ``hold`` — the source is lost but for less than ``hold_s``: the last picture repeats;
* ``pass`` — the engine raised, produced NaN/inf, ran out of memory, or one call has run
  longer than ``stall_s``: the newest *input* frame goes out, scaled to the output size;
* ``fade`` — the engine recovered (``recover_after`` good calls in a row): a crossfade
  from the input back to the filtered picture over ``fade_s``;
* ``engine`` — the filtered picture (which may itself be a passthrough: bypass, loading).

After ``restart_after`` failed calls in a row the engine is restarted (rebuilt in the
background while the input passes through); sources and sinks are not touched.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from broadcast_filter.setting import setting

ON_AIR_KINDS = ("engine", "fade", "pass", "hold", "slate")


@dataclass(frozen=True)
class SafetySettings:
    """The ``safety:`` section of the daemon config; all need a restart to change."""

    stall_s: float = setting(1.0, lo=0, hi=60, open_lo=True, help="one call longer: pass")
    restart_after: int = setting(5, lo=1, hi=1000, help="failed calls in a row: rebuild")
    recover_after: int = setting(3, lo=1, hi=1000, help="good calls in a row: fade back")
    fade_s: float = setting(0.5, lo=0, hi=10, help="crossfade from input back to the filter")
    hold_s: float = setting(2.0, lo=0, hi=3600, help="source lost: hold, then a slate")
    sink_retry_s: float = setting(1.0, lo=0, hi=60, open_lo=True, help="first sink re-open")
    sink_retry_max_s: float = setting(30.0, lo=0, hi=3600, open_lo=True, help="longest wait")


@dataclass(frozen=True)
class WatchState:
    """What the watchdog knows. ``fault`` is why the input is passed through (or ``None``)."""

    fault: str | None = None
    failures: int = 0  # failed calls in a row
    good: int = 0  # good calls in a row since the last fault
    busy_since: float | None = None  # the engine call in progress started then
    fade_start: float | None = None
    restart: bool = False  # the engine thread should restart the engine
    restarts: int = 0
    faults: int = 0  # faults seen (calls that failed, stalls)
    on_air: str = "engine"
    reason: str = ""
    switches: int = 0


@dataclass(frozen=True)
class OnAir:
    """What the output sends this tick: a kind from :data:`ON_AIR_KINDS`, the crossfade
    weight of the filtered picture (``fade`` only) and a reason for the status line."""

    kind: str
    weight: float = 1.0
    reason: str = ""


def classify(exc: BaseException) -> str:
    """A short reason for an engine failure: out of memory, non-finite output, or the error."""
    chain: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in chain:
        chain.append(node)
        node = node.__cause__ or node.__context__
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    text = " ".join(str(e) for e in chain).lower()
    if "OutOfMemoryError" in names or "MemoryError" in names or "out of memory" in text:
        return "engine out of memory"
    if "non-finite" in text or "nan" in text.split():
        return "engine output NaN/inf"
    return f"engine error: {type(chain[-1]).__name__}"


def engine_started(state: WatchState, now: float) -> WatchState:
    return replace(state, busy_since=now)


def engine_finished(
    state: WatchState, now: float, fault: str | None, policy: SafetySettings
) -> WatchState:
    """One engine call ended, well (``fault=None``) or not. Failures switch to passthrough
    at once; enough in a row ask for a restart; enough good calls in a row fade back."""
    state = replace(state, busy_since=None)
    if fault is not None:
        failures = state.failures + 1
        restart = failures >= policy.restart_after
        return replace(
            state,
            fault=fault,
            failures=0 if restart else failures,
            good=0,
            fade_start=None,
            restart=state.restart or restart,
            restarts=state.restarts + restart,
            faults=state.faults + 1,
        )
    if state.fault is None:
        return replace(state, failures=0)
    good = state.good + 1
    if good >= policy.recover_after:
        return replace(state, fault=None, failures=0, good=0, fade_start=now)
    return replace(state, failures=0, good=good)


def restart_taken(state: WatchState) -> WatchState:
    return replace(state, restart=False)


def on_air(
    state: WatchState,
    now: float,
    policy: SafetySettings,
    *,
    input_age: float,
    source_lost: bool,
) -> tuple[WatchState, OnAir]:
    """Choose this tick's picture; ``input_age`` is the time since the last captured frame."""
    stalled = state.busy_since is not None and now - state.busy_since > policy.stall_s
    if stalled and not (state.fault or "").startswith("engine stalled"):
        state = replace(
            state,
            fault=f"engine stalled (one call > {policy.stall_s:g} s)",
            good=0,
            fade_start=None,
            faults=state.faults + 1,
        )
    if input_age > policy.hold_s:
        why = "source lost" if source_lost else f"no input for {policy.hold_s:g} s"
        pick = OnAir("slate", reason=f"no signal: {why}")
    elif source_lost:
        pick = OnAir("hold", reason="source lost (holding last frame)")
    elif state.fault is not None:
        pick = OnAir("pass", reason=f"passthrough: {state.fault}")
    elif state.fade_start is not None and now - state.fade_start < policy.fade_s:
        weight = (now - state.fade_start) / policy.fade_s if policy.fade_s > 0 else 1.0
        pick = OnAir("fade", weight=min(max(weight, 0.0), 1.0), reason="engine recovered")
    else:
        pick = OnAir("engine")
    if pick.kind != state.on_air and not {pick.kind, state.on_air} <= {"engine", "fade"}:
        state = replace(state, switches=state.switches + 1)
    return replace(state, on_air=pick.kind, reason=pick.reason), pick


class Watchdog:
    """The :class:`WatchState` shared by the engine and output threads."""

    def __init__(self, policy: SafetySettings) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._state = WatchState()

    @property
    def state(self) -> WatchState:
        with self._lock:
            return self._state

    def started(self, now: float) -> None:
        with self._lock:
            self._state = engine_started(self._state, now)

    def finished(self, now: float, fault: str | None) -> bool:
        """Record a call's outcome; True when the caller should restart the engine now."""
        with self._lock:
            self._state = engine_finished(self._state, now, fault, self.policy)
            restart = self._state.restart
            self._state = restart_taken(self._state)
            return restart

    def tick(self, now: float, *, input_age: float, source_lost: bool) -> tuple[OnAir, bool]:
        """This tick's picture, and whether it differs from the last tick's kind."""
        with self._lock:
            before = self._state.on_air, self._state.reason
            self._state, pick = on_air(
                self._state, now, self.policy, input_age=input_age, source_lost=source_lost
            )
            return pick, (pick.kind, pick.reason) != before
