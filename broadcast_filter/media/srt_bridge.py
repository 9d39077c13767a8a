"""SRT through ``srt-live-transmit`` (Debian ``srt-tools``): PyAV's FFmpeg has no SRT protocol.

An I/O process runs the bridge between the SRT URL and a private loopback UDP port and reads
or writes MPEG-TS there with PyAV. The bridge reconnects by itself (``-a:yes``) and shares
the I/O process's stderr; see :func:`~broadcast_filter.media.portable.bridge_argv` for how
it dies with the I/O process.
"""

from __future__ import annotations

import shutil
import socket
import subprocess

from broadcast_filter.media.base import MediaError
from broadcast_filter.media.portable import bridge_argv


def require_srt_tools() -> None:
    """Raise a MediaError that says what to install when ``srt-live-transmit`` is missing."""
    if shutil.which("srt-live-transmit") is None:
        raise MediaError(
            "SRT needs the srt-live-transmit tool (PyAV has no SRT protocol): "
            "install it with 'apt-get install srt-tools' (Debian/Ubuntu)"
        )


def free_udp_port() -> int:
    """A loopback UDP port that was free a moment ago (for the private bridge hop)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_srt_bridge(srt_url: str, udp_port: int, *, inbound: bool) -> subprocess.Popen[bytes]:
    """Run the bridge: inbound SRT -> ``udp://127.0.0.1:PORT``, outbound ``udp://:PORT`` -> SRT."""
    udp = f"udp://127.0.0.1:{udp_port}" if inbound else f"udp://:{udp_port}"
    argv = ["srt-live-transmit", "-q", "-a:yes", *((srt_url, udp) if inbound else (udp, srt_url))]
    # stdin: a pipe that lives as long as this process, so the bridge dies with it (see
    # bridge_argv); the Popen object keeps our end open
    return subprocess.Popen(bridge_argv(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
