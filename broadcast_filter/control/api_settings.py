"""The ``api:`` section of the daemon config: where the local HTTP/WebSocket API and the
OBS dock listen, and who may use them.

Declared once here; :mod:`broadcast_filter.control.config` derives the section's schema from
these fields. The rules the section enforces (docs/control.md, "Security"): loopback by
default; any other address needs ``token``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from broadcast_filter.setting import setting

#: the documented default port (``http://127.0.0.1:8760/`` is the dock)
DEFAULT_PORT = 8760


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal (``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ApiSettings:
    """The API server. ``token`` is kept out of ``repr``; with ``token_env`` it holds that
    variable's value, read when the config is loaded."""

    bind: str = setting("127.0.0.1", help="address to listen on; non-loopback needs token")
    port: int = setting(DEFAULT_PORT, lo=0, hi=65535, help="TCP port (0: any free port)")
    token: str = setting("", empty=True, repr=False, help="better: token_env")
    token_env: str | None = setting(None, help="environment variable holding the token")
    allowed_hosts: tuple[str, ...] = setting(
        (), help="extra Host header names accepted (e.g. a LAN host name)"
    )
    status_hz: float = setting(4.0, lo=0.2, hi=30, help="WebSocket status pushes per second")
    preview_fps: float = setting(5.0, lo=0.1, hi=30, help="most preview JPEGs encoded per second")
    preview_width: int = setting(320, lo=32, hi=1920, help="preview JPEG width (pixels)")
    max_body_bytes: int = setting(16384, lo=256, hi=1048576, help="largest request body")

    @property
    def token_setting(self) -> str:
        """Where the token comes from, for messages (never the token itself)."""
        return (
            f"api.token_env (environment variable {self.token_env})"
            if self.token_env
            else ("api.token")
        )

    def url(self, port: int | None = None) -> str:
        """The dock's URL (with ``?token=...`` when a token is set): what goes in OBS's
        Docks > Custom Browser Docks."""
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "::", "") else self.bind
        host = f"[{host}]" if ":" in host else host
        query = f"?token={self.token}" if self.token else ""
        return f"http://{host}:{self.port if port is None else port}/{query}"
