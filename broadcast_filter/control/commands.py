"""What a control surface (CLI keys, OBS, an API) may ask of the running daemon.

Every control surface talks to the daemon through this one protocol, so each can be tested
against any implementation of it. Calls are cheap and thread-safe: they queue a change that
the engine applies at the next frame boundary, and never wait for the video path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np


class Commands(Protocol):
    def apply_preset(self, name: str) -> None:
        """Switch to the named preset (crossfading); raise ``KeyError`` for an unknown name."""

    def step_preset(self, offset: int) -> str:
        """Move ``offset`` places in the preset list (+1 next, -1 previous); return the new name."""

    def set_bypass(self, on: bool | None) -> bool:
        """Set bypass (``None`` toggles); return the new state."""

    def set_param(self, name: str, value: Any) -> None:
        """Change one live parameter (e.g. ``guidance_scale``); raise ``ValueError`` if invalid."""

    def set_params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Change several live parameters of the active preset at once, or none of them:
        ``ValueError`` (naming the field) if any is invalid. Returns the live values after."""

    def prepare_preset(self, name: str) -> None:
        """Warm the named preset before it goes on air (its prompt is encoded ahead of the
        cut); nothing on air changes. Raise ``KeyError`` for an unknown name."""

    def preset_names(self) -> list[str]:
        """The presets the daemon knows, in list order."""

    def presets(self) -> list[dict[str, Any]]:
        """The presets in list order, each ``{"name", "description", "active",
        "needs_reload", "bypass"}``; ``active`` marks the preset on air (or asked for)."""

    def preview(self) -> np.ndarray | None:
        """The picture the sinks got last (HxWx3 uint8 RGB), or ``None`` before the first."""

    def status(self) -> dict[str, Any]:
        """A snapshot: ``preset``, ``bypass``, ``fps_in``, ``fps_model``, ``fps_out``,
        ``latency_ms_p50``, ``latency_ms_p95``, ``skip_ratio``, ``mode``, ``on_air``; with a
        running daemon also ``sinks``, ``failed_sinks``, ``fields`` (source, OBS, ...),
        ``health`` and ``engine_restarts``; ``requested`` is the preset and ``params`` the
        live values asked for (applied at the next frame boundary)."""
