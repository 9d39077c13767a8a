"""The ``obs:`` section of the daemon config: how the OBS bridge reaches OBS and what it maps.

Declared once here; :mod:`broadcast_filter.control.config` derives the section's schema
from these fields, so every mistake names file, line and field like the rest of the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broadcast_filter.setting import setting


@dataclass(frozen=True)
class ObsSettings:
    """Where OBS is and what its scenes and items mean. ``password`` is kept out of ``repr``;
    with ``password_env`` it holds that variable's value, read when the config is loaded."""

    host: str = setting("127.0.0.1", help="obs-websocket host")
    port: int = setting(4455, lo=1, hi=65535, help="obs-websocket port")
    password: str = setting("", empty=True, repr=False, help="better: password_env")
    password_env: str | None = setting(None, help="environment variable holding the password")
    scene_presets: Mapping[str, str] = setting(factory=dict, help="program scene: preset")
    item_presets: Mapping[str, str] = setting(factory=dict, help="controls item: preset|bypass")
    controls_scene: str = setting("broadcast_filter controls")
    status_source: str | None = setting("broadcast_filter status", help="text source or null")
    status_interval_s: float = setting(1.0, lo=0, open_lo=True)
    warm_preview: bool = setting(True, help="studio mode: prepare the preview scene's preset")
    output_source: str = setting("broadcast_filter output")
    output_url: str = setting("udp://127.0.0.1:23000")
    output_format: str = setting("mpegts", empty=True)
    reconnect_max_s: float = setting(5.0, lo=0, open_lo=True)
    sync_audio: tuple[str, ...] = setting(
        (), help="OBS audio inputs whose sync offset follows the daemon's video delay"
    )

    @property
    def password_setting(self) -> str:
        """Where the password comes from, for error messages."""
        if self.password_env:
            return f"obs.password_env (environment variable {self.password_env})"
        return "obs.password"

    def connection(self) -> dict[str, Any]:
        """Keyword arguments for obsws-python clients (always explicit: no config.toml)."""
        return {"host": self.host, "port": self.port, "password": self.password}
