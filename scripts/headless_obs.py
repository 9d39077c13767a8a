"""Run a real OBS Studio headless (Xvfb) with obs-websocket on, for tests and by hand.

Each run gets a fresh config tree, a free X display and a free websocket port, so several can
run side by side. Facts this relies on (OBS 29 / obs-websocket 5.1): the websocket settings
live in ``global.ini [OBSWebSocket]``; ``--multi`` avoids the machine-wide "already running"
dialog; the port opens only once scenes are loaded, so a successful connect means ready;
a clean close is WM_DELETE_WINDOW to the main window (SIGTERM exits without saving).

    python scripts/headless_obs.py --password secret   # prints the URL, Ctrl-C stops OBS
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

OBS_LAST_VERSION = (29 << 24) | (0 << 16) | 2
PR_SET_PDEATHSIG = 1
FONT = {"face": "DejaVu Sans", "size": 32, "style": "Book", "flags": 0}


def is_available() -> str | None:
    """``None`` when OBS, Xvfb and xdotool are installed, else what is missing."""
    missing = [tool for tool in ("obs", "Xvfb", "xdotool") if shutil.which(tool) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def color_source(name: str, color: int = 0xFF804020, width: int = 640, height: int = 360) -> dict:
    """A scene-collection entry for a solid color (``color`` is ABGR)."""
    settings = {"color": color, "width": width, "height": height}
    return {
        "id": "color_source_v3",
        "versioned_id": "color_source_v3",
        "name": name,
        "settings": settings,
    }


def text_source(name: str, text: str) -> dict:
    """A scene-collection entry for a FreeType text source."""
    settings = {"text": text, "font": FONT}
    return {
        "id": "text_ft2_source_v2",
        "versioned_id": "text_ft2_source_v2",
        "name": name,
        "settings": settings,
    }


def scene_collection(
    scenes: dict[str, list[tuple[str, bool]]],
    sources: list[dict],
    hotkeys: dict[str, dict[str, list[str]]] | None = None,
) -> dict:
    """A scene collection: ``scenes`` maps scene -> [(source name, visible)], in order;
    ``hotkeys`` maps scene -> {hotkey name: [OBS key names]}, e.g.
    ``{"Controls": {"libobs.show_scene_item.Warm": ["OBS_KEY_F6"]}}``."""
    hotkeys = hotkeys or {}
    entries = list(sources)
    for scene, items in scenes.items():
        scene_items = [
            {
                "name": name,
                "id": i,
                "visible": visible,
                "pos": {"x": 0, "y": 0},
                "scale": {"x": 1, "y": 1},
                "align": 5,
            }
            for i, (name, visible) in enumerate(items, start=1)
        ]
        keys = {
            name: [{"key": key} for key in keys] for name, keys in hotkeys.get(scene, {}).items()
        }
        entries.append(
            {
                "id": "scene",
                "versioned_id": "scene",
                "name": scene,
                "hotkeys": keys,
                "settings": {"id_counter": len(items), "items": scene_items},
            }
        )
    first = next(iter(scenes))
    return {
        "name": "CI",
        "current_scene": first,
        "current_program_scene": first,
        "current_transition": "Cut",
        "scene_order": [{"name": s} for s in scenes],
        "sources": entries,
    }


def default_collection() -> dict:
    """Two plain scenes, enough to talk to."""
    sources = [color_source("Background")]
    return scene_collection({"Scene A": [("Background", True)], "Scene B": []}, sources)


def write_config(home: Path, port: int, password: str, collection: dict) -> None:
    """Write the config tree that makes OBS 29 start unattended with the websocket on."""
    obs_dir = home / ".config" / "obs-studio"
    (obs_dir / "basic" / "profiles" / "CI").mkdir(parents=True, exist_ok=True)
    (obs_dir / "basic" / "scenes").mkdir(parents=True, exist_ok=True)
    (home / "runtime").mkdir(mode=0o700, exist_ok=True)
    (obs_dir / "global.ini").write_text(
        "[General]\nFirstRun=true\n"
        f"LastVersion={OBS_LAST_VERSION}\n"
        "Pre19Defaults=false\nPre21Defaults=false\nPre23Defaults=false\nPre24.1Defaults=false\n"
        "\n[Basic]\nProfile=CI\nProfileDir=CI\nSceneCollection=CI\nSceneCollectionFile=CI\n"
        "\n[BasicWindow]\nPreviewEnabled=false\n"
        "\n[OBSWebSocket]\nFirstLoad=false\nServerEnabled=true\n"
        f"ServerPort={port}\nAlertsEnabled=false\nAuthRequired=true\nServerPassword={password}\n"
    )
    (obs_dir / "basic" / "profiles" / "CI" / "basic.ini").write_text(
        "[General]\nName=CI\n\n[Video]\nBaseCX=640\nBaseCY=360\nOutputCX=640\nOutputCY=360\n"
        "FPSType=1\nFPSInt=30\n"
    )
    (obs_dir / "basic" / "scenes" / "CI.json").write_text(json.dumps(collection, indent=1))


def _die_with_parent() -> None:
    """Child side of Popen: get SIGKILL when the spawning thread exits (keep it the main one)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _ClientMessage(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("serial", ctypes.c_ulong),
        ("send_event", ctypes.c_int),
        ("display", ctypes.c_void_p),
        ("window", ctypes.c_ulong),
        ("message_type", ctypes.c_ulong),
        ("format", ctypes.c_int),
        ("data", ctypes.c_long * 5),
        ("pad", ctypes.c_long * 17),  # XEvent is 24 longs
    ]


def send_wm_delete(display: str, windows: list[int]) -> None:
    """Send WM_DELETE_WINDOW (what a window manager's close button sends) to ``windows``."""
    x11 = ctypes.CDLL(ctypes.util.find_library("X11"))
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    x11.XInternAtom.restype = ctypes.c_ulong
    x11.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    x11.XSendEvent.argtypes = [
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_int,
        ctypes.c_long,
        ctypes.c_void_p,
    ]
    x11.XFlush.argtypes = x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    dpy = x11.XOpenDisplay(display.encode())
    if not dpy:
        raise OSError(f"cannot open X display {display}")
    try:
        protocols = x11.XInternAtom(dpy, b"WM_PROTOCOLS", 0)
        delete = x11.XInternAtom(dpy, b"WM_DELETE_WINDOW", 0)
        for window in windows:
            event = _ClientMessage(
                type=33, send_event=1, display=dpy, window=window, message_type=protocols, format=32
            )
            event.data[0] = delete
            x11.XSendEvent(dpy, window, 0, 0, ctypes.byref(event))
        x11.XFlush(dpy)
    finally:
        x11.XCloseDisplay(dpy)


class HeadlessObs:
    """One OBS under its own Xvfb. ``start()`` = ``launch()`` + ``wait_ready()``; ``stop()``
    closes cleanly and removes the config tree. Launch from the main thread (PDEATHSIG)."""

    def __init__(
        self,
        collection: dict | None = None,
        *,
        password: str = "ci-secret",
        port: int | None = None,
        scene: str | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.collection = collection or default_collection()
        self.password = password
        self.port = port or free_port()
        self.scene = scene or self.collection["current_program_scene"]
        self.home = Path(workdir or tempfile.mkdtemp(prefix="headless-obs-"))
        self._own_home = workdir is None
        self.display = ""
        self.xvfb: subprocess.Popen | None = None
        self.obs: subprocess.Popen | None = None
        write_config(self.home, self.port, password, self.collection)

    @property
    def log_path(self) -> Path:
        return self.home / "obs.log"

    def connection(self) -> dict[str, Any]:
        """Keyword arguments for obsws-python clients."""
        return {"host": "127.0.0.1", "port": self.port, "password": self.password}

    def start(self, timeout: float = 30.0) -> HeadlessObs:
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self, scene: str | None = None) -> None:
        """Start Xvfb (once) and OBS on it, showing ``scene`` on program; do not wait."""
        if self.xvfb is None:
            self._start_xvfb()
        env = dict(
            os.environ,
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(self.home / ".config"),
            XDG_RUNTIME_DIR=str(self.home / "runtime"),
            DISPLAY=self.display,
            LIBGL_ALWAYS_SOFTWARE="1",
        )
        env.pop("XAUTHORITY", None)
        cmd = [
            "obs",
            "--multi",
            "--collection",
            "CI",
            "--profile",
            "CI",
            "--scene",
            scene or self.scene,
            "--disable-missing-files-check",
        ]
        with open(self.log_path, "ab") as log:
            self.obs = subprocess.Popen(
                cmd,
                cwd=self.home,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # a terminal's Ctrl-C reaches only us: we close OBS
            )

    def _start_xvfb(self) -> None:
        read_fd, write_fd = os.pipe()
        cmd = [
            "Xvfb",
            "-displayfd",
            str(write_fd),
            "-screen",
            "0",
            "1280x720x24",
            "-nolisten",
            "tcp",
        ]
        self.xvfb = subprocess.Popen(
            cmd,
            pass_fds=(write_fd,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            number = pipe.readline().strip()
        if not number:
            raise RuntimeError("Xvfb did not start (no display number)")
        self.display = f":{number}"

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Block until an authenticated ``GetVersion`` answers; return the seconds waited."""
        import obsws_python

        start = time.monotonic()
        while True:
            if self.obs is None or self.obs.poll() is not None:
                raise RuntimeError(f"OBS exited early; log: {self.log_path}\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError as err:
                if time.monotonic() - start > timeout:
                    raise TimeoutError(
                        f"OBS not ready after {timeout} s; log: {self.log_path}"
                    ) from err
                time.sleep(0.05)
                continue
            client = obsws_python.ReqClient(**self.connection(), timeout=5)
            client.get_version()
            client.disconnect()
            return time.monotonic() - start

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self, timeout: float = 10.0) -> bool:
        """Close OBS cleanly (WM_DELETE_WINDOW); kill it if that fails. True when clean."""
        if self.obs is None or self.obs.poll() is not None:
            return True
        found = subprocess.run(
            ["xdotool", "search", "--onlyvisible", "--pid", str(self.obs.pid), "--name", "^OBS "],
            env=dict(os.environ, DISPLAY=self.display),
            capture_output=True,
            text=True,
        )
        windows = [int(w) for w in found.stdout.split()]
        if windows:
            send_wm_delete(self.display, windows)
            try:
                self.obs.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return False

    def kill(self) -> None:
        """SIGKILL OBS (a crash, as clients see it)."""
        if self.obs is not None and self.obs.poll() is None:
            self.obs.kill()
            self.obs.wait()

    def key(self, key: str, hold: float = 0.1) -> None:
        """Press and release a real key on OBS's display (XTEST), as a user's keyboard would."""
        env = dict(os.environ, DISPLAY=self.display)
        subprocess.run(["xdotool", "keydown", key], env=env, check=True)
        time.sleep(hold)
        subprocess.run(["xdotool", "keyup", key], env=env, check=True)

    def stop(self) -> None:
        """Close OBS, stop Xvfb, remove the config tree (kept if OBS had to be killed)."""
        clean = self.close()
        if self.xvfb is not None:
            self.xvfb.terminate()
            self.xvfb.wait()
            self.xvfb = None
        if clean and self._own_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> HeadlessObs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, help="websocket port (default: a free one)")
    parser.add_argument("--password", default="ci-secret")
    args = parser.parse_args()
    if missing := is_available():
        parser.error(missing)
    with HeadlessObs(password=args.password, port=args.port) as obs:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        print(
            f"OBS ready: ws://127.0.0.1:{obs.port} password {args.password!r} "
            f"display {obs.display} config {obs.home}; Ctrl-C stops it",
            flush=True,
        )
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
