"""The local HTTP/WebSocket API against a running daemon (test pattern -> tiny model at
64x64 -> recording sink), built and started the way ``broadcast-filter run`` does it:
every endpoint and error, the token, Host and Origin rules, WebSocket pushes and events,
``/metrics`` through prometheus_client's own parser, and a hypothesis fuzz of the JSON
endpoints (never a 500, never a partial change). Requests are plain ``http.client`` so the
tests control every header (Host, Origin) as a browser or an attacker would send it.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import websocket
from daemon_harness import running, wait_for, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from broadcast_filter.control.api import ApiServer, host_name
from broadcast_filter.control.api_settings import ApiSettings
from broadcast_filter.control.config import ConfigError, load_config
from broadcast_filter.runtime.build import build_daemon, start_api
from broadcast_filter.runtime.telemetry import StatusLine

pytestmark = pytest.mark.slow

TOKEN = "s3cret-T0KEN-for-tests"
FPS = 15
SIZE = (64, 64)
OTHER_MODEL = "description: the tiny model with its tiny autoencoder\nprompt: a forest\n"
OTHER_MODEL += "cfg_type: none\nt_index_list: [40]\nssf: {enabled: false}\nmodel: {taesd: tiny}\n"


class Api:
    """A client for one server: ``call`` returns ``(status, headers, body)``; JSON bodies
    are decoded. ``token=None`` sends none; ``host``/``origin`` override those headers."""

    def __init__(self, port: int, token: str | None = TOKEN) -> None:
        self.port, self.token = port, token

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: str | bool | None = True,
        host: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        sent = {"Host": host or f"127.0.0.1:{self.port}", **(headers or {})}
        use = self.token if token is True else token
        if use:
            sent["X-Api-Token"] = use
        if data is not None:
            sent["Content-Type"] = "application/json"
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for key, value in sent.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(len(data or b"")))
        conn.endheaders(data)
        response = conn.getresponse()
        content = response.read()
        conn.close()
        got = {k.lower(): v for k, v in response.getheaders()}
        if got.get("content-type", "").startswith("application/json"):
            return response.status, got, json.loads(content)
        return response.status, got, content

    def status(self) -> dict[str, Any]:
        code, _, body = self.call("GET", "/api/status")
        assert code == 200, body
        return body


@pytest.fixture(scope="module")
def live(model_cache: str, tmp_path_factory: pytest.TempPathFactory):
    """``(daemon, api, lines)``: one daemon with a token-protected API for the module."""
    folder = tmp_path_factory.mktemp("api")
    config = write_config(
        folder,
        source="testsrc",
        sinks=["bf-record"],
        size=SIZE,
        fps=FPS,
        start="warm",
        cache_dir=model_cache,
        api={"port": 0, "token": TOKEN, "preview_fps": 0.1, "preview_width": 32},
    )
    (folder / "presets" / "other.yaml").write_text(OTHER_MODEL)
    with running(config) as (daemon, _bridge, lines):
        wait_for("the first output frame", lambda: daemon.stats()["health"]["ready"], 60)
        yield daemon, Api(daemon.api.port), lines


@pytest.fixture
def api(live: Any) -> Api:
    _, api, _ = live
    # a switch the previous test asked for goes on air first: taken at a frame boundary, it
    # could otherwise show after "warm" was seen (a status of the old preset in between)
    wait_for("the last preset asked for on air", lambda: on_air_as_asked(api.status()), 20)
    # every test starts from the same state: preset warm, bypass off, its file's params
    api.call("POST", "/api/bypass", {"on": False})
    api.call("POST", "/api/preset", {"name": "warm"})  # the file's version: params reset
    wait_for("preset warm", lambda: api.status()["preset"] == "warm", 20)
    return api


def on_air_as_asked(status: dict[str, Any]) -> bool:
    return status["preset"] == status["requested"]


def wanted(daemon: Any) -> tuple[str, bool, dict[str, Any]]:
    """What the controller will put on air next: preset, bypass, live params."""
    status = daemon.controller.status()
    return status["requested"], status["bypass_requested"], status["params"]


# ----------------------------------------------------------------------------- config


def write_api_config(tmp_path: Path, api: str) -> Path:
    path = tmp_path / "daemon.yaml"
    path.write_text(f"model: {{id: tiny}}\nsinks: [null]\n{api}")
    return path


def test_the_api_is_off_without_a_section_and_on_with_defaults_with_one(tmp_path: Path) -> None:
    assert load_config(write_api_config(tmp_path, "")).api is None
    on = load_config(write_api_config(tmp_path, "api: {}\n")).api
    assert on == ApiSettings() and (on.bind, on.port) == ("127.0.0.1", 8760)
    default = load_config(Path(__file__).parents[1] / "configs" / "default.yaml").api
    assert default is not None and default.bind == "127.0.0.1" and not default.token


def test_a_non_loopback_bind_without_a_token_is_refused_naming_api_token(tmp_path: Path) -> None:
    path = write_api_config(tmp_path, "api:\n  bind: 0.0.0.0\n  port: 9000\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "api.token" in str(err.value) and "daemon.yaml:4" in str(err.value)  # the bind line
    ok = load_config(write_api_config(tmp_path, f"api:\n  bind: 0.0.0.0\n  token: {TOKEN}\n"))
    assert ok.api.token == TOKEN and TOKEN not in repr(ok)


def test_token_env_is_read_at_load_and_a_missing_variable_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_api_config(tmp_path, "api:\n  bind: 0.0.0.0\n  token_env: BF_TEST_API_TOKEN\n")
    monkeypatch.delenv("BF_TEST_API_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"api\.token_env: environment variable BF_TEST_API"):
        load_config(path)
    monkeypatch.setenv("BF_TEST_API_TOKEN", TOKEN)
    config = load_config(path)
    assert config.api.token == TOKEN and config.api.url().endswith(f"/?token={TOKEN}")


def test_host_names_are_parsed_without_their_port() -> None:
    assert host_name("[::1]:8760") == "::1"
    assert host_name("LocalHost:80") == "localhost"
    assert host_name("127.0.0.1") == "127.0.0.1"


# ----------------------------------------------------------------------------- endpoints


def test_status_reports_preset_mode_rates_latency_sinks_and_health(api: Api) -> None:
    status = api.status()
    for key in ("preset", "mode", "on_air", "bypass", "fps_in", "fps_model", "fps_out"):
        assert key in status
    for key in ("latency_ms_p50", "latency_ms_p95", "dropped", "skip_ratio", "frames_out"):
        assert key in status
    assert status["sinks"] == ["bf-record"] and status["failed_sinks"] == {}
    assert status["health"] == {"ready": True, "healthy": True, "problems": []}
    assert status["source_up"] is True and status["params"]["prompt"] == "warm sunset colours"


def test_presets_lists_descriptions_the_active_one_and_needs_reload(api: Api) -> None:
    code, _, body = api.call("GET", "/api/presets")
    assert code == 200
    names = [p["name"] for p in body["presets"]]
    assert names == ["cool", "other", "passthrough", "warm"] and body["active"] == "warm"
    other = next(p for p in body["presets"] if p["name"] == "other")
    assert other["needs_reload"] and other["description"].startswith("the tiny model")
    assert not any(p["needs_reload"] for p in body["presets"] if p["name"] != "other")
    assert [p["name"] for p in body["presets"] if p["active"]] == ["warm"]


def test_a_preset_switch_shows_in_the_next_status_and_in_the_engines_conditioning(
    api: Api, live: Any
) -> None:
    daemon, _, lines = live
    code, _, body = api.call("POST", "/api/preset", {"name": "cool"})
    assert (code, body) == (200, {"requested": "cool"})
    wait_for("preset cool on air", lambda: api.status()["preset"] == "cool", 10)
    engine = daemon.controller.engine
    assert engine.preset.prompt == "cool blue night"
    expected = engine.pipe.encode_prompt("cool blue night", "")
    wait_for("the embeddings", lambda: bool((engine.embeds.cond == expected.cond).all()), 10)
    assert any("api (127.0.0.1): preset 'cool'" in line for line in lines.lines)


def test_next_and_previous_step_through_the_list(api: Api) -> None:
    assert api.call("POST", "/api/preset/next")[2] == {"requested": "cool"}  # warm -> wraps
    assert api.call("POST", "/api/preset/next", {})[2] == {"requested": "other"}
    assert api.call("POST", "/api/preset/previous")[2] == {"requested": "cool"}
    code, _, body = api.call("POST", "/api/preset/next", {"by": 2})
    assert code == 400 and body["field"] == "by"


def test_bypass_on_off_and_toggle_change_the_on_air_mode(api: Api) -> None:
    assert api.call("POST", "/api/bypass", {"on": True})[2] == {"bypass": True}
    wait_for("mode bypass", lambda: api.status()["mode"] == "bypass", 10)
    assert api.call("POST", "/api/bypass", {"on": "toggle"})[2] == {"bypass": False}
    wait_for("styled again", lambda: api.status()["mode"] in ("styled", "crossfade"), 10)
    code, _, body = api.call("POST", "/api/bypass", {"on": "yes"})
    assert code == 400 and body["field"] == "on" and "toggle" in body["error"]


def test_live_params_change_together_or_not_at_all(api: Api, live: Any) -> None:
    daemon = live[0]
    code, _, body = api.call(
        "POST", "/api/params", {"guidance_scale": 1.5, "seed": 9, "prompt": "red roses"}
    )
    assert code == 200 and body["params"]["seed"] == 9
    wait_for("the engine's guidance", lambda: daemon.controller.engine.guidance_scale == 1.5, 10)
    assert daemon.controller.engine.preset.prompt == "red roses"
    before = wanted(daemon)
    code, _, body = api.call("POST", "/api/params", {"seed": 3, "guidance_scale": 99})
    assert code == 400 and body["field"] == "guidance_scale" and "<= 20" in body["error"]
    assert wanted(daemon) == before  # the valid seed was not kept either
    code, _, body = api.call("POST", "/api/params", {"model": {"id": "x"}})
    assert code == 400 and body["field"] == "model" and "cannot be changed live" in body["error"]
    code, _, body = api.call("POST", "/api/params", {"strength": 0.5})
    assert code == 200 and body["params"]["t_index_list"] != before[2]["t_index_list"]
    levels = body["params"]["t_index_list"]
    code, _, body = api.call("POST", "/api/params", {"strength": None})  # found by the fuzz
    assert code == 200 and body["params"]["strength"] is None
    assert body["params"]["t_index_list"] == levels
    code, _, body = api.call("POST", "/api/params", {"t_index_list": None})
    assert code == 400 and body["field"] == "t_index_list"


def test_errors_are_clear_4xx_and_the_stream_goes_on(api: Api, live: Any) -> None:
    daemon = live[0]
    before = wanted(daemon)
    out = daemon.stats()["frames_out"]
    cases = [
        (("POST", "/api/preset"), {"raw": b"{not json"}, 400, "malformed JSON"),
        (("POST", "/api/preset"), {"raw": b"[1, 2]"}, 400, "expected a JSON object"),
        (("POST", "/api/preset"), {"body": {"name": "nope"}}, 404, "no preset named 'nope'"),
        (("POST", "/api/preset"), {"body": {"name": 3}}, 400, "name: expected"),
        (("POST", "/api/preset"), {"body": {"nam": "x"}}, 400, "unknown field 'nam'"),
        (("POST", "/api/params"), {"body": {}}, 400, "at least one parameter"),
        (("POST", "/api/params"), {"raw": b"x" * 20000}, 413, "larger than 16384 bytes"),
        (("GET", "/api/nothing"), {}, 404, "Not Found"),
        (("GET", "/api/preset"), {}, 405, "Method Not Allowed"),
        (("POST", "/api/status"), {}, 405, "Method Not Allowed"),
    ]
    for (method, path), kwargs, code, message in cases:
        got, headers, body = api.call(method, path, **kwargs)
        assert got == code and message in body["error"], (path, kwargs, body)
        assert headers["content-type"].startswith("application/json")
    assert wanted(daemon) == before
    wait_for("more output frames", lambda: daemon.stats()["frames_out"] > out + FPS, 10)


def test_health_is_200_while_frames_flow_and_says_when_the_output_stalled(
    api: Api, live: Any
) -> None:
    daemon = live[0]
    code, _, body = api.call("GET", "/api/health")
    assert (code, body["ready"], body["healthy"]) == (200, True, True)
    later = daemon.health(time.monotonic() + 30)  # as if no frame had gone out for 30 s
    assert not later["healthy"] and "output stalled" in later["problems"][0]


def test_before_the_first_frame_health_is_503_and_there_is_no_preview(
    model_cache: str, tmp_path: Path
) -> None:
    config_path = write_config(
        tmp_path,
        source="testsrc",
        sinks=["null"],
        size=SIZE,
        fps=FPS,
        start="warm",
        cache_dir=model_cache,
        api={"port": 0},
    )
    config = load_config(config_path)
    daemon = build_daemon(config, status=StatusLine(io.StringIO()), progress=False)
    try:
        server = start_api(config, daemon)
        client = Api(server.port, token=None)
        code, _, body = client.call("GET", "/api/health")
        assert code == 503 and body["problems"] == ["no output frame yet"]
        code, _, body = client.call("GET", "/api/preview.jpg")
        assert code == 503 and body["error"] == "no output frame yet"
    finally:
        daemon.stop()  # never run: stop releases source, sinks and the API server


def test_the_preview_is_a_downscaled_jpeg_encoded_at_most_at_preview_fps(api: Api) -> None:
    code, headers, first = api.call("GET", "/api/preview.jpg")
    assert code == 200 and headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(first))
    assert picture.format == "JPEG" and picture.size == (32, 32)  # preview_width 32
    # preview_fps 0.1: one encoding per 10 s, shared by every request meanwhile
    assert api.call("GET", "/api/preview.jpg")[2] == first


def test_the_dock_page_is_served_offline(api: Api) -> None:
    code, headers, page = api.call("GET", "/")
    text = page.decode()
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert "/api/ws" in text and "/api/preset" in text
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


# ----------------------------------------------------------------------------- security


def test_without_the_right_token_it_is_401_and_nothing_changes(api: Api, live: Any) -> None:
    daemon, _, lines = live
    before = wanted(daemon)
    for token in (None, "wrong", TOKEN[:-1]):
        for method, path, body in (
            ("GET", "/api/status", None),
            ("GET", "/metrics", None),
            ("GET", "/", None),
            ("POST", "/api/preset", {"name": "cool"}),
            ("POST", "/api/bypass", {"on": True}),
            ("POST", "/api/params", {"seed": 11}),
        ):
            code, _, answer = api.call(method, path, body, token=token)
            assert code == 401 and answer == {
                "error": "missing or wrong API token",
                "field": "token",
            }
    assert wanted(daemon) == before
    assert api.call("GET", f"/api/status?token={TOKEN}", token=None)[0] == 200
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert api.call("GET", "/api/status", token=None, headers=bearer)[0] == 200
    api.call("POST", "/api/preset", {"name": "cool"})
    seen = json.dumps(api.status()) + "\n".join(lines.lines)
    seen += api.call("GET", "/metrics")[2].decode()
    assert TOKEN not in seen


def test_only_the_bound_address_and_localhost_are_accepted_as_host(api: Api, live: Any) -> None:
    port = api.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert api.call("GET", "/api/status", host=host)[0] == 200, host
    before = wanted(live[0])
    for host in (f"evil.example:{port}", "attacker.test", f"192.168.1.20:{port}"):
        code, _, body = api.call("POST", "/api/preset", {"name": "cool"}, host=host)
        assert code == 403 and "Host header" in body["error"], host
    assert wanted(live[0]) == before


def test_state_changes_from_a_foreign_origin_are_refused_and_no_cors_is_offered(
    api: Api, live: Any
) -> None:
    daemon = live[0]
    before = wanted(daemon)
    for origin in ("http://evil.example", "null", f"http://localhost:{api.port + 1}"):
        code, _, body = api.call("POST", "/api/bypass", {"on": True}, headers={"Origin": origin})
        assert code == 403 and "another origin" in body["error"], origin
    cross = {"Sec-Fetch-Site": "cross-site"}
    assert api.call("GET", "/api/preview.jpg", headers=cross)[0] == 403
    assert wanted(daemon) == before
    same = {"Origin": f"http://127.0.0.1:{api.port}"}
    assert api.call("POST", "/api/bypass", {"on": False}, headers=same)[0] == 200
    code, headers, _ = api.call("GET", "/api/status", headers={"Origin": "http://evil.example"})
    assert code == 200 and not any(k.startswith("access-control") for k in headers)
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    code, headers, _ = api.call("OPTIONS", "/api/preset", headers=preflight)
    assert code == 403 and not any(k.startswith("access-control") for k in headers)


def test_the_websocket_needs_the_token_and_the_dock_origin(api: Api) -> None:
    url = f"ws://127.0.0.1:{api.port}/api/ws"
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(url, timeout=5)
    assert err.value.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(f"{url}?token={TOKEN}", origin="http://evil.example")
    assert err.value.status_code == 403


def test_an_api_port_in_use_is_an_error_naming_api_port(live: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = ApiSettings(port=busy.getsockname()[1])
        with pytest.raises(OSError, match=r"api.bind/api.port: cannot listen on 127.0.0.1:"):
            ApiServer(settings, live[0].controller).start()


# ----------------------------------------------------------------------------- pushes, metrics


def test_the_websocket_pushes_status_and_every_control_event(api: Api) -> None:
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{api.port}/api/ws?token={TOKEN}",
        origin=f"http://127.0.0.1:{api.port}",
        timeout=10,
    )
    try:
        first = json.loads(ws.recv())
        assert first["type"] == "status" and first["preset"] == "warm"
        api.call("POST", "/api/preset", {"name": "cool"})
        events, statuses = [], []
        while not (
            any("preset 'cool'" in e for e in events)
            and any(s["preset"] == "cool" for s in statuses)
        ):
            message = json.loads(ws.recv())
            target = events if message["type"] == "event" else statuses
            target.append(message["message"] if message["type"] == "event" else message)
    finally:
        ws.close()


def test_metrics_parse_with_prometheus_client_and_counters_move_with_frames(
    api: Api, live: Any
) -> None:
    def scrape() -> dict[str, Any]:
        code, headers, body = api.call("GET", "/metrics")
        assert code == 200 and headers["content-type"].startswith("text/plain")
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    first = scrape()
    for name in ("frames_in", "frames_out", "frames_dropped", "frames_skipped", "frames_model"):
        assert (f"broadcast_filter_{name}_total", ()) in first
    assert first[("broadcast_filter_on_air", (("kind", "engine"),))] == 1.0
    assert sum(v for (n, _), v in first.items() if n == "broadcast_filter_on_air") == 1.0
    assert first[("broadcast_filter_sink_up", (("sink", "bf-record"),))] == 1.0
    assert first[("broadcast_filter_source_up", ())] == 1.0
    assert ("broadcast_filter_engine_restarts_total", ()) in first
    assert ("broadcast_filter_fps", (("stage", "model"),)) in first
    inf = first[("broadcast_filter_latency_seconds_bucket", (("le", "+Inf"),))]
    assert inf == first[("broadcast_filter_latency_seconds_count", ())] > 0

    def moved() -> bool:
        now = scrape()
        key = ("broadcast_filter_frames_out_total", ())
        count = ("broadcast_filter_latency_seconds_count", ())
        return now[key] >= first[key] + FPS and now[count] > first[count]

    wait_for("frame counters to move", moved, 10, step=0.2)
    api.call("POST", "/api/bypass", {"on": True})
    wait_for(
        "on-air pass in metrics",
        lambda: scrape()[("broadcast_filter_bypass", ())] == 1.0,
        10,
    )


# ----------------------------------------------------------------------------- fuzz

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=8,
)
FIELDS = st.sampled_from(
    [
        "name",
        "on",
        "prompt",
        "guidance_scale",
        "delta",
        "strength",
        "t_index_list",
        "seed",
        "transition",
        "cfg_type",
        "model",
        "bypass",
        "steps",
        "",
    ]
)
BODIES = (
    st.dictionaries(FIELDS, JSON, max_size=4).map(lambda d: json.dumps(d).encode())
    | JSON.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=64)
)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(["/api/preset", "/api/bypass", "/api/params", "/api/preset/next"]),
    raw=BODIES,
)
def test_fuzzed_json_bodies_never_500_and_never_change_part_of_the_state(
    live: Any, path: str, raw: bytes
) -> None:
    daemon, api, _ = live
    before = wanted(daemon)
    code, _, body = api.call("POST", path, raw=raw)
    assert code < 500, (path, raw, body)
    after = wanted(daemon)
    if code >= 400:
        assert isinstance(body["error"], str) and body["error"]
        assert after == before, (path, raw, body)
        return
    sent = json.loads(raw) if raw.strip() else {}
    if path == "/api/params":  # every field asked for changed, as given
        assert set(after[2]) == set(before[2])
        for key, value in sent.items():
            assert key in body["params"]
            if key not in ("strength", "t_index_list", "prompt") and key in after[2]:
                assert after[2][key] == (list(value) if isinstance(value, tuple) else value)
    elif path == "/api/preset":
        assert after[0] == sent["name"]
    elif path == "/api/bypass":
        assert after[1] == (not before[1] if sent["on"] == "toggle" else sent["on"])
