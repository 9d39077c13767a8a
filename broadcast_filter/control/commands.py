"""What a control surface (CLI keys, OBS, an API) may ask of the running daemon.

Every control surface talks to the daemon through this one protocol, so each can be tested
against any implementation of it. Calls are cheap and thread-safe: they queue a change that
the engine applies at the next frame boundary, and never wait for the video path.
"""

from __future__ import annotations

from typing import Any, Protocol


class Commands(Protocol):
    def apply_preset(self, name: str) -> None:
        """Switch to the named preset (crossfading); raise ``KeyError`` for an unknown name."""

    def step_preset(self, offset: int) -> str:
        """Move ``offset`` places in the preset list (+1 next, -1 previous); return the new name."""

    def set_bypass(self, on: bool | None) -> bool:
        """Set bypass (``None`` toggles); return the new state."""

    def set_param(self, name: str, value: Any) -> None:
        """Change one live parameter (e.g. ``guidance_scale``); raise ``ValueError`` if invalid."""

    def prepare_preset(self, name: str) -> None:
        """Warm the named preset before it goes on air (its prompt is encoded ahead of the
        cut); nothing on air changes. Raise ``KeyError`` for an unknown name."""

    def preset_names(self) -> list[str]:
        """The presets the daemon knows, in list order."""

    def status(self) -> dict[str, Any]:
        """A snapshot: ``preset``, ``bypass``, ``fps_in``, ``fps_model``, ``fps_out``,
        ``latency_ms_p50``, ``latency_ms_p95``, ``skip_ratio``, ``mode``."""
