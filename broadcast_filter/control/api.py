"""The local HTTP/WebSocket API, the OBS dock page and ``/metrics``.

Every state change goes through :class:`~broadcast_filter.control.commands.Commands` (the
same calls the OBS bridge makes); reads use ``Commands.status()``/``presets()``/``preview()``.
The server runs aiohttp on its own event loop in its own thread: the video path never waits
for it, and it only ever takes the controller's lock for a moment.

Safety rules (docs/control.md, "Security"): a token (when set) on every request, the Host
header limited to the bound address and localhost (DNS rebinding), state-changing requests
and WebSockets only from the dock's own origin, no CORS headers, bodies size-limited and
validated with errors naming the field. The token never appears in logs or errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import ipaddress
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from aiohttp import WSMsgType, web

from broadcast_filter.control.api_settings import ApiSettings, is_loopback
from broadcast_filter.control.commands import Commands
from broadcast_filter.control.metrics import metrics_text

TOKEN_HEADER = "X-Api-Token"
SAFE_METHODS = ("GET", "HEAD")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
SEND_TIMEOUT_S = 2.0


class ApiError(Exception):
    """A request the API refuses: HTTP ``status``, a message and the field it is about."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def clean_json(value: Any) -> Any:
    """``value`` with NaN/inf replaced by ``None`` and tuples by lists (valid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(clean_json(value), allow_nan=False)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(text=dumps(value), status=status, content_type="application/json")


def host_name(header: str) -> str:
    """The name part of a Host header (``[::1]:8760`` -> ``::1``), lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostRule:
    """Which Host header names the server answers to: the bound address, ``localhost`` and
    the loopback literals (when bound to loopback), ``allowed_hosts``; with a wildcard bind
    any IP literal too (an IP literal cannot be DNS-rebound)."""

    def __init__(self, settings: ApiSettings) -> None:
        bind = settings.bind.lower()
        self.wildcard = bind in WILDCARD_BINDS
        self.names = {"localhost", bind, *settings.allowed_hosts}
        if is_loopback(bind) or self.wildcard:
            self.names |= {"127.0.0.1", "::1"}

    def allows(self, header: str | None) -> bool:
        if not header:
            return False
        name = host_name(header)
        return name in self.names or (self.wildcard and _is_ip(name))


class ApiServer:
    """The API on ``settings.bind``:``settings.port`` (``port`` says which, after
    :meth:`start`), serving ``commands``; ``log`` gets one line per state change."""

    def __init__(
        self,
        settings: ApiSettings,
        commands: Commands,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.settings, self.commands, self.log = settings, commands, log
        self.hosts = HostRule(settings)
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._preview: tuple[float, bytes] | None = None
        self._preview_lock: asyncio.Lock | None = None
        self._pusher: asyncio.Task | None = None
        self._dock = resources.files("broadcast_filter.control").joinpath("dock.html").read_text()
        self.requests = 0  # handled requests (all answers), for tests and benchmarks

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> ApiServer:
        """Bind and serve in a thread; return once listening. ``OSError`` names
        ``api.bind``/``api.port`` when the address cannot be bound."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="api", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise OSError("the API server did not start in time")
        if failure:
            self._thread.join(1)
            exc = failure[0]
            where = f"{self.settings.bind}:{self.settings.port}"
            raise OSError(f"api.bind/api.port: cannot listen on {where}: {exc}") from None
        return self

    async def _open(self) -> None:
        app = web.Application(
            client_max_size=self.settings.max_body_bytes,
            middlewares=[self._guard],
        )
        app.router.add_get("/", self._page)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/presets", self._presets)
        app.router.add_post("/api/preset", self._apply)
        app.router.add_post("/api/preset/next", self._step(1))
        app.router.add_post("/api/preset/previous", self._step(-1))
        app.router.add_post("/api/bypass", self._bypass)
        app.router.add_post("/api/params", self._params)
        app.router.add_get("/api/health", self._health)
        app.router.add_get("/api/preview.jpg", self._preview_jpeg)
        app.router.add_get("/api/ws", self._websocket)
        app.router.add_get("/metrics", self._metrics)
        self._preview_lock = asyncio.Lock()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.bind or None, self.settings.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.port
        self._pusher = asyncio.get_running_loop().create_task(self._push_status())

    def stop(self, timeout: float = 2.0) -> None:
        """Close every WebSocket and the listening socket; end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._close(), loop)
        with contextlib.suppress(Exception):  # best effort; the thread is a daemon
            future.result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    async def _close(self) -> None:
        if self._pusher is not None:
            self._pusher.cancel()
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def publish(self, message: str) -> None:
        """Send ``message`` to every WebSocket as an ``event`` (thread-safe, never blocks)."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self._sockets:
            return
        text = dumps({"type": "event", "message": message, "time": time.time()})
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(lambda: loop.create_task(self._fanout(text)))

    # ------------------------------------------------------------------ rules

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        self.requests += 1
        try:
            self._check(request)
            return await handler(request)
        except ApiError as err:
            body = {"error": err.message} | ({"field": err.field} if err.field else {})
            return _json(body, err.status)
        except web.HTTPRequestEntityTooLarge:
            limit = self.settings.max_body_bytes
            return _json({"error": f"request body larger than {limit} bytes"}, 413)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _json({"error": exc.reason}, exc.status)
        except Exception as exc:  # a bug: say so in JSON and in the log; the stream goes on
            self.log(f"api: {request.method} {request.path} failed: {exc!r}")
            return _json({"error": f"internal error ({type(exc).__name__})"}, 500)

    def _check(self, request: web.Request) -> None:
        host = request.headers.get("Host")
        if not self.hosts.allows(host):
            raise ApiError(403, "Host header not allowed (use the bound address or localhost)")
        if request.headers.get("Sec-Fetch-Site") == "cross-site":
            raise ApiError(403, "cross-site requests are not allowed")
        token = self.settings.token
        if token:
            given = request.headers.get(TOKEN_HEADER) or ""
            auth = request.headers.get("Authorization", "")
            if not given and auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            given = given or request.query.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise ApiError(401, "missing or wrong API token", "token")
        changes = request.method not in SAFE_METHODS or request.path == "/api/ws"
        origin = request.headers.get("Origin")
        if changes and origin is not None:
            origin = origin.lower().rstrip("/")
            if origin not in (f"http://{host.lower()}", f"https://{host.lower()}"):
                raise ApiError(403, "requests from another origin are not allowed")

    async def _body(self, request: web.Request, *, optional: bool = False) -> dict[str, Any]:
        raw = await request.read()  # raises 413 past client_max_size
        if not raw.strip() and optional:
            return {}
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"malformed JSON body: {exc}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "expected a JSON object")
        return value

    @staticmethod
    def _only(body: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
        for key in body:
            if key not in allowed:
                names = ", ".join(allowed) or "none"
                raise ApiError(400, f"unknown field {key!r} (allowed: {names})", str(key))

    def _said(self, request: web.Request, what: str) -> None:
        self.log(f"api ({request.remote}): {what}")

    # ------------------------------------------------------------------ handlers

    async def _page(self, request: web.Request) -> web.Response:
        headers = {
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
            "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
            "connect-src 'self'; frame-ancestors 'none'",
            "Cache-Control": "no-store",
        }
        return web.Response(text=self._dock, content_type="text/html", headers=headers)

    async def _status(self, request: web.Request) -> web.Response:
        return _json(self.commands.status())

    async def _presets(self, request: web.Request) -> web.Response:
        listing = self.commands.presets()
        active = next((p["name"] for p in listing if p["active"]), None)
        return _json({"active": active, "presets": listing})

    async def _apply(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._only(body, ("name",))
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "name: expected the preset's name (text)", "name")
        try:
            self.commands.apply_preset(name)
        except KeyError as exc:
            raise ApiError(404, str(exc.args[0]) if exc.args else str(exc), "name") from None
        self._said(request, f"preset {name!r}")
        return _json({"requested": name})

    def _step(self, offset: int) -> Callable:
        async def step(request: web.Request) -> web.Response:
            self._only(await self._body(request, optional=True), ())
            name = self.commands.step_preset(offset)
            self._said(request, f"{'next' if offset > 0 else 'previous'} preset: {name!r}")
            return _json({"requested": name})

        return step

    async def _bypass(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._only(body, ("on",))
        on = body.get("on", "missing")
        if on not in (True, False, "toggle") or not isinstance(on, bool | str):
            raise ApiError(400, 'on: expected true, false or "toggle"', "on")
        state = self.commands.set_bypass(None if on == "toggle" else on)
        self._said(request, f"bypass {'on' if state else 'off'}")
        return _json({"bypass": state})

    async def _params(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if not body:
            raise ApiError(400, 'expected at least one parameter, e.g. {"guidance_scale": 1.2}')
        try:
            values = self.commands.set_params(body)
        except ValueError as exc:
            message = str(exc)
            field = next((k for k in body if message.startswith((f"{k}:", f"{k!r}"))), None)
            raise ApiError(400, message, field) from None
        shown = ", ".join(f"{k}={v!r:.60}" for k, v in body.items())
        self._said(request, f"set {shown}")
        return _json({"params": values})

    async def _health(self, request: web.Request) -> web.Response:
        health = self.commands.status().get("health") or {
            "ready": False,
            "healthy": False,
            "problems": ["no daemon health"],
        }
        return _json(health, 200 if health["healthy"] else 503)

    async def _preview_jpeg(self, request: web.Request) -> web.Response:
        """The last output, downscaled, as JPEG; encoded at most ``preview_fps`` times a
        second whatever the number of clients (they share the newest encoding)."""
        assert self._preview_lock is not None
        async with self._preview_lock:
            now = time.monotonic()
            cached = self._preview
            if cached is None or now - cached[0] >= 1.0 / self.settings.preview_fps:
                image = self.commands.preview()
                if image is None:
                    raise ApiError(503, "no output frame yet")
                loop = asyncio.get_running_loop()
                data = await loop.run_in_executor(None, _encode_jpeg, image, self._width())
                self._preview = cached = (now, data)
        headers = {"Cache-Control": "no-store"}
        return web.Response(body=cached[1], content_type="image/jpeg", headers=headers)

    def _width(self) -> int:
        return self.settings.preview_width

    async def _metrics(self, request: web.Request) -> web.Response:
        text = metrics_text(self.commands.status())
        return web.Response(
            body=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=self.settings.max_body_bytes)
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await ws.send_str(self._status_message())
            async for message in ws:  # the socket only pushes; incoming text is ignored
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self._sockets.discard(ws)
        return ws

    # ------------------------------------------------------------------ pushes

    def _status_message(self) -> str:
        return dumps({"type": "status", **self.commands.status()})

    async def _push_status(self) -> None:
        """Push the status to every WebSocket ``status_hz`` times a second (one snapshot
        for all of them)."""
        period = 1.0 / self.settings.status_hz
        while True:
            await asyncio.sleep(period)
            if self._sockets:
                try:
                    text = self._status_message()
                except Exception as exc:  # keep pushing; say why once per failure
                    text = dumps({"type": "event", "message": f"status failed: {exc!r}"})
                await self._fanout(text)

    async def _fanout(self, text: str) -> None:
        sockets = list(self._sockets)
        if sockets:
            await asyncio.gather(*(self._send(ws, text) for ws in sockets))

    async def _send(self, ws: web.WebSocketResponse, text: str) -> None:
        """Send to one client; a client that cannot keep up or is gone is dropped."""
        try:
            await asyncio.wait_for(ws.send_str(text), SEND_TIMEOUT_S)
        except Exception:
            self._sockets.discard(ws)
            await ws.close()


def _encode_jpeg(image: Any, width: int) -> bytes:
    from PIL import Image

    picture = Image.fromarray(image)
    if picture.width > width:
        height = max(1, round(picture.height * width / picture.width))
        picture = picture.resize((width, height), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=75)
    return out.getvalue()
