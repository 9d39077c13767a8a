"""The OBS bridge, ``obs setup`` and ``obs status`` against a real, headless OBS Studio 29.

Fixtures come from ``tests/obs_fixtures.py`` (one OBS per session). The daemon side is a
small recording :class:`Commands`; the full-daemon version of these tests comes with the
daemon. Latencies are printed (``pytest -s -k latency``), never asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from typing import Any

import obsws_python
import pytest
import yaml

from broadcast_filter.control import obs_bridge
from broadcast_filter.control.config import ConfigError, load_config
from broadcast_filter.control.obs_bridge import (
    Call,
    ObsBridge,
    format_status,
    format_sync,
    parse_custom_event,
    sync_ms,
)
from broadcast_filter.control.obs_cli import add_obs_parser
from broadcast_filter.control.obs_settings import ObsSettings

SECRET = "hunter2-not-logged"


class RecordingCommands:
    """A thread-safe :class:`Commands` that records each call with its ``perf_counter`` time."""

    def __init__(self, presets: tuple[str, ...] = ("warm", "cool", "noir")) -> None:
        self.presets = list(presets)
        self.preset = self.presets[0]
        self.bypass = False
        self.calls: list[tuple[float, str, tuple]] = []
        self._changed = threading.Condition()

    def _record(self, name: str, *args: Any) -> None:
        with self._changed:
            self.calls.append((time.perf_counter(), name, args))
            self._changed.notify_all()

    def apply_preset(self, name: str) -> None:
        if name not in self.presets:
            raise KeyError(name)
        self.preset = name
        self._record("apply_preset", name)

    def step_preset(self, offset: int) -> str:
        index = (self.presets.index(self.preset) + offset) % len(self.presets)
        self.preset = self.presets[index]
        self._record("step_preset", offset)
        return self.preset

    def set_bypass(self, on: bool | None) -> bool:
        self.bypass = not self.bypass if on is None else on
        self._record("set_bypass", on)
        return self.bypass

    def set_param(self, name: str, value: Any) -> None:
        if not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number")
        self._record("set_param", name, value)

    def prepare_preset(self, name: str) -> None:
        self._record("prepare_preset", name)

    def preset_names(self) -> list[str]:
        return list(self.presets)

    def status(self) -> dict[str, Any]:
        return {"preset": self.preset, "bypass": self.bypass, "fps_out": 30.0, "latency_ms_p50": 80}

    def wait_call(self, name: str, *args: Any, after: float, timeout: float = 5.0) -> float:
        """The time of the first call ``name(*args)`` made after ``after``."""

        def found() -> float | None:
            return next(
                (t for t, n, a in self.calls if t >= after and (n, a) == (name, args)), None
            )

        with self._changed:
            if not self._changed.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no {name}{args} after {timeout} s; calls: {self.calls}")
            return found()  # type: ignore[return-value]

    def calls_since(self, after: float) -> list[tuple[str, tuple]]:
        with self._changed:
            return [(n, a) for t, n, a in self.calls if t >= after]


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def status_text(req: Any) -> str:
    return req.get_input_settings("BF Status").input_settings.get("text", "")


def report(label: str, seconds: list[float]) -> None:
    ms = sorted(1000 * s for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    print(
        f"\n{label}: n={len(ms)} median {statistics.median(ms):.1f} ms, "
        f"p95 {p95:.1f} ms, max {ms[-1]:.1f} ms"
    )


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="broadcast-filter")
    add_obs_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


# --- settings, payloads and status text: no OBS needed --------------------------------------


def obs_settings(mapping: dict, folder: Any) -> ObsSettings:
    """``mapping`` as the ``obs:`` section of a daemon config file, parsed as the daemon does."""
    path = folder / "daemon.yaml"
    text = yaml.safe_dump({"model": {"id": "tiny"}, "sinks": ["null"], "obs": mapping})
    path.write_text(text)
    return load_config(path).obs


def test_settings_read_every_field(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("BF_OBS_PW", SECRET)
    settings = obs_settings(
        {
            "host": "10.0.0.2",
            "port": 4460,
            "password_env": "BF_OBS_PW",
            "scene_presets": {"Cam": "warm"},
            "item_presets": {"Warm key": "warm", "Bypass key": "bypass"},
            "controls_scene": "Keys",
            "status_source": None,
            "status_interval_s": 2,
            "warm_preview": False,
            "output_url": "srt://127.0.0.1:9000?mode=caller",
            "output_format": "",
            "sync_audio": ["Mic/Aux", "Desktop Audio"],
        },
        tmp_path,
    )
    assert settings.password == SECRET
    assert (settings.host, settings.port, settings.status_source) == ("10.0.0.2", 4460, None)
    assert settings.item_presets["Bypass key"] == "bypass"
    assert settings.status_interval_s == 2.0 and settings.warm_preview is False
    assert settings.sync_audio == ("Mic/Aux", "Desktop Audio")
    assert ObsSettings().sync_audio == ()
    assert "BF_OBS_PW" in settings.password_setting
    assert SECRET not in repr(settings)


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ({"port": "4455"}, "obs.port: expected a whole number >= 1 and <= 65535, got '4455'"),
        ({"port": 70000}, "obs.port: expected a whole number >= 1 and <= 65535, got 70000"),
        ({"prot": 4455}, "obs.prot: unknown key (allowed: host, port, password,"),
        ({"scene_presets": {"Cam": 3}}, "obs.scene_presets: expected a mapping of OBS name"),
        ({"status_interval_s": 0}, "obs.status_interval_s: expected a number > 0, got 0"),
        ({"warm_preview": "yes"}, "obs.warm_preview: expected true or false, got 'yes'"),
        ({"password": SECRET, "password_env": "X"}, "obs.password: give either"),
        ({"password_env": "BF_UNSET_VAR"}, "obs.password_env: environment variable BF_UNSET_VAR"),
        ({"password": [SECRET]}, "obs.password: expected text, got (hidden)"),
        ({"sync_audio": "Mic/Aux"}, "obs.sync_audio: expected a list of OBS input names"),
        ({"sync_audio": ["Mic/Aux", ""]}, "obs.sync_audio: expected a list of OBS input names"),
        ({"sync_audio": ["Mic", "Mic"]}, "obs.sync_audio: expected each OBS input name once"),
    ],
)
def test_settings_errors_name_the_line_and_field(mapping: dict, expected: str, tmp_path) -> None:
    with pytest.raises(ConfigError) as error:
        obs_settings(mapping, tmp_path)
    assert f"{tmp_path / 'daemon.yaml'}:" in str(error.value) and expected in str(error.value)
    assert SECRET not in str(error.value)


def test_custom_event_payloads_parse_to_actions() -> None:
    parse = parse_custom_event
    assert parse({"other_app": {"x": 1}}) is None
    assert parse({"broadcast_filter": {"preset": "warm"}}) == [Call("apply_preset", ("warm",))]
    assert parse({"broadcast_filter": {"step": -1}}) == [Call("step_preset", (-1,))]
    assert parse({"broadcast_filter": {"bypass": "toggle"}}) == [Call("set_bypass", (None,))]
    assert parse({"broadcast_filter": {"bypass": False}}) == [Call("set_bypass", (False,))]
    assert parse({"broadcast_filter": {"set": {"guidance_scale": 1.4, "delta": 0.5}}}) == [
        Call("set_param", ("guidance_scale", 1.4)),
        Call("set_param", ("delta", 0.5)),
    ]
    calls = parse({"broadcast_filter": {"bypass": True, "preset": "cool"}})
    commands = RecordingCommands()
    for call in calls:
        call(commands)  # each parsed call performs itself on any Commands
    assert [c[1:] for c in commands.calls] == [("apply_preset", ("cool",)), ("set_bypass", (True,))]
    assert [str(c) for c in calls] == ["apply_preset('cool')", "set_bypass(True)"]


@pytest.mark.parametrize(
    "command",
    [
        "warm",
        {},
        {"preset": 3},
        {"step": "1"},
        {"step": True},
        {"bypass": 1},
        {"set": []},
        {"jump": 1},
    ],
)
def test_malformed_custom_event_payloads_are_rejected(command: Any) -> None:
    with pytest.raises(ValueError):
        parse_custom_event({"broadcast_filter": command})


def test_status_text_shows_preset_bypass_rate_and_latency() -> None:
    status = {"preset": "warm", "bypass": False, "fps_out": 29.94, "latency_ms_p50": 141.6}
    assert format_status(status) == "warm | 29.9 fps | 142 ms"
    assert format_status({"preset": "warm", "bypass": True}) == "BYPASS (warm)"
    assert format_status({}) == "-"


def test_sync_offset_and_its_status_text() -> None:
    assert sync_ms(0.4204) == 420 and sync_ms(0.0) == 0
    assert sync_ms(25.0) == 20000 and sync_ms(-2.0) == -950  # obs-websocket's bounds
    assert format_sync({"Mic/Aux": 420}, {}) == "Mic/Aux sync +420 ms"
    assert (
        format_sync({"Mic/Aux": 420, "Desk": 420, "Aux 2": 0}, {"Mic 2": "missing"})
        == "Mic/Aux, Desk sync +420 ms, Aux 2 sync +0 ms, 'Mic 2' missing"
    )


def test_start_returns_at_once_and_retries_when_obs_is_absent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # nothing listens on port 1
    settings = ObsSettings(port=1, reconnect_max_s=0.5, scene_presets={"Cam": "sepia"})
    bridge = ObsBridge(settings, RecordingCommands())
    started = time.perf_counter()
    bridge.start()
    assert time.perf_counter() - started < 0.05
    wait_until(lambda: bridge.state == "disconnected", 5, "state disconnected")
    assert "127.0.0.1:1" in (bridge.error or "")
    assert "obs.scene_presets.Cam: unknown preset 'sepia'" in caplog.text
    bridge.stop()
    assert bridge.state == "stopped"


# --- against a real OBS ----------------------------------------------------------------------


@pytest.fixture
def commands() -> RecordingCommands:
    return RecordingCommands()


@pytest.fixture
def bridge(obs_mapping: dict, obs_client: Any, commands: RecordingCommands, tmp_path) -> Any:
    """A connected bridge, started with OBS on Scene A: "warm" applied and shown as status."""
    obs_client.set_current_program_scene("Scene A")
    instance = ObsBridge(obs_settings(obs_mapping, tmp_path), commands).start()
    wait_until(lambda: instance.state == "connected", 10, "the bridge to connect")
    commands.wait_call("apply_preset", "warm", after=0)
    wait_until(lambda: status_text(obs_client).startswith("warm |"), 5, "the first status text")
    yield instance
    instance.stop()


@pytest.mark.slow
def test_program_scene_switch_applies_mapped_preset_latency(
    bridge: ObsBridge, obs_client: Any, commands: RecordingCommands
) -> None:
    latencies = []
    for scene, preset in [("Scene B", "cool"), ("Scene A", "warm")] * 10:
        sent = time.perf_counter()
        obs_client.set_current_program_scene(scene)
        latencies.append(commands.wait_call("apply_preset", preset, after=sent) - sent)
    report("SetCurrentProgramScene -> apply_preset", latencies)
    sent = time.perf_counter()
    obs_client.set_current_program_scene("Scene C")  # not mapped: the preset stays
    time.sleep(0.3)
    assert [c for c in commands.calls_since(sent) if c[0] == "apply_preset"] == []


@pytest.mark.slow
def test_real_key_press_on_show_item_hotkey_switches_preset_latency(
    bridge: ObsBridge, obs_peer: Any, obs_client: Any, commands: RecordingCommands
) -> None:
    def all_hidden() -> bool:
        return not any(
            i["sceneItemEnabled"]
            for i in obs_client.get_scene_item_list(bridge.settings.controls_scene).scene_items
        )

    latencies = []
    # F6 twice in a row: the bridge hides the item again, so the same key works again
    for key, call in [
        ("F7", ("apply_preset", "cool")),
        ("F6", ("apply_preset", "warm")),
        ("F6", ("apply_preset", "warm")),
        ("F8", ("set_bypass", None)),
        ("F8", ("set_bypass", None)),
    ]:
        pressed = time.perf_counter()
        obs_peer.key(key, hold=0.2)  # OBS polls the keyboard; a loaded machine needs a long hold
        latencies.append(commands.wait_call(call[0], *call[1:], after=pressed) - pressed)
        wait_until(all_hidden, 5, "the bridge to hide the item again")
        time.sleep(0.2)  # OBS loses show/hide presses closer than ~50 ms apart
    report("X key down (xdotool) -> Commands call", latencies)
    assert commands.bypass is False  # toggled twice


@pytest.mark.slow
def test_custom_events_drive_commands_and_malformed_ones_are_ignored_latency(
    bridge: ObsBridge, obs_peer: Any, commands: RecordingCommands, caplog: pytest.LogCaptureFixture
) -> None:
    sender = obsws_python.ReqClient(**obs_peer.connection(), timeout=5)
    reader = bridge._events  # a reconnect would replace it

    def send(data: dict) -> float:
        sent = time.perf_counter()
        sender.broadcast_custom_event({"eventData": data})
        return sent

    latencies = []
    for _ in range(3):
        sent = send({"broadcast_filter": {"preset": "noir"}})
        latencies.append(commands.wait_call("apply_preset", "noir", after=sent) - sent)
        sent = send({"broadcast_filter": {"step": 1}})
        latencies.append(commands.wait_call("step_preset", 1, after=sent) - sent)
        sent = send({"broadcast_filter": {"bypass": True}})
        latencies.append(commands.wait_call("set_bypass", True, after=sent) - sent)
        sent = send({"broadcast_filter": {"set": {"guidance_scale": 1.4}}})
        latencies.append(commands.wait_call("set_param", "guidance_scale", 1.4, after=sent) - sent)
    report("BroadcastCustomEvent -> Commands call", latencies)

    with caplog.at_level(logging.WARNING, logger="broadcast_filter.control.obs_bridge"):
        for data in [
            {"__slots__": 1},  # obsws-python's own event conversion raises on this key
            {"broadcast_filter": "warm"},
            {"broadcast_filter": {"bypass": "maybe"}},
            {"broadcast_filter": {"jump": 1}},
            {"broadcast_filter": {"preset": "no-such-preset"}},  # Commands raises KeyError
            {"broadcast_filter": {"set": {"guidance_scale": "high"}}},  # Commands: ValueError
            {"unrelated": True},
        ]:
            send(data)
        sent = send({"broadcast_filter": {"preset": "cool", "bypass": "toggle"}})
        commands.wait_call("apply_preset", "cool", after=sent)
        commands.wait_call("set_bypass", None, after=sent)
    sender.disconnect()
    assert bridge.state == "connected" and bridge._events is reader and reader.worker.is_alive()
    assert "ignored CustomEvent" in caplog.text and "no-such-preset" in caplog.text


@pytest.mark.slow
def test_studio_mode_preview_scene_prepares_its_preset(
    bridge: ObsBridge, obs_client: Any, commands: RecordingCommands
) -> None:
    obs_client.set_studio_mode_enabled(True)
    try:
        time.sleep(0.2)
        sent = time.perf_counter()
        obs_client.set_current_preview_scene("Scene B")
        commands.wait_call("prepare_preset", "cool", after=sent)
        assert commands.preset == "warm"  # preview only prepares
    finally:
        obs_client.set_studio_mode_enabled(False)


@pytest.mark.slow
def test_status_text_source_shows_the_active_preset(
    bridge: ObsBridge, obs_client: Any, commands: RecordingCommands
) -> None:
    obs_client.set_current_program_scene("Scene B")
    wait_until(lambda: status_text(obs_client).startswith("cool |"), 5, "status text 'cool'")
    obs_client.set_current_program_scene("Scene A")
    wanted = "warm | 30.0 fps | 80 ms"
    wait_until(lambda: status_text(obs_client) == wanted, 5, "status text 'warm'")


@pytest.mark.slow
def test_bridge_survives_obs_crash_and_close_without_blocking_the_caller(
    bridge: ObsBridge, obs_peer: Any, commands: RecordingCommands
) -> None:
    ticks, gaps, done = [0], [0.0], threading.Event()

    def video_path() -> None:  # what the daemon's frame loop does with the bridge
        last = time.perf_counter()
        while not done.is_set():
            bridge.state  # noqa: B018 - the status line reads it every frame
            now = time.perf_counter()
            ticks[0], gaps[0], last = ticks[0] + 1, max(gaps[0], now - last), now
            time.sleep(0.005)

    ticker = threading.Thread(target=video_path)
    ticker.start()
    try:
        obs_peer.kill()
        wait_until(lambda: bridge.state == "disconnected", 5, "state disconnected")
        before = ticks[0]
        time.sleep(1.0)  # OBS is down: the bridge retries with backoff
        assert ticks[0] > before
        restarted = time.perf_counter()
        obs_peer.launch(scene="Scene B")
        obs_peer.wait_ready()
        commands.wait_call("apply_preset", "cool", after=restarted, timeout=10)
        seconds = time.perf_counter() - restarted
        print(f"\nreconnected and applied 'cool' {seconds:.2f} s after the relaunch")
        wait_until(lambda: bridge.state == "connected", 5, "state connected")

        closing = time.perf_counter()
        assert obs_peer.close()  # clean close: ExitStarted, the bridge lets go at once
        print(f"clean OBS close with the bridge connected: {time.perf_counter() - closing:.2f} s")
        relaunched = time.perf_counter()
        obs_peer.launch(scene="Scene A")
        obs_peer.wait_ready()
        commands.wait_call("apply_preset", "warm", after=relaunched, timeout=10)
        assert ticks[0] > before + 100
    finally:
        done.set()
        ticker.join()
    print(f"video-path ticks: {ticks[0]}, longest gap {1000 * gaps[0]:.0f} ms")
    assert gaps[0] < 0.5


@pytest.mark.slow
def test_wrong_password_is_a_clear_error_naming_the_setting(
    obs_peer: Any,
    obs_mapping: dict,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
    tmp_path: Any,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("BF_TEST_OBS_PASSWORD", SECRET)
    mapping = {k: v for k, v in obs_mapping.items() if k != "password"}
    env = "BF_TEST_OBS_PASSWORD"
    for extra, setting in [({"password": SECRET}, "obs.password"), ({"password_env": env}, env)]:
        commands = RecordingCommands()
        bridge = ObsBridge(obs_settings(mapping | extra, tmp_path), commands).start()
        try:
            wait_until(lambda b=bridge: b.state == "auth failed", 5, "state 'auth failed'")
            assert setting in (bridge.error or "") and "refused the password" in bridge.error
            assert commands.calls == []
        finally:
            bridge.stop()
    code, _, err = run_cli(
        capsys,
        "obs",
        "status",
        "--port",
        str(obs_peer.port),
        "--password-env",
        "BF_TEST_OBS_PASSWORD",
    )
    assert code == 1 and "obs.password_env" in err and "BF_TEST_OBS_PASSWORD" in err
    assert SECRET not in caplog.text and SECRET not in err and SECRET not in repr(bridge)


SIZED_BY_CONTENT = {"sourceWidth", "sourceHeight", "width", "height"}


def obs_snapshot(req: Any) -> dict[str, Any]:
    """Scenes, inputs with kinds and settings, and every scene's items, as OBS reports them,
    less the sizes OBS derives from content once rendered (a new text source starts at 0)."""
    scenes = sorted(s["sceneName"] for s in req.get_scene_list().scenes)
    inputs = sorted((i["inputName"], i["inputKind"]) for i in req.get_input_list().inputs)
    items = {}
    for scene in scenes:
        items[scene] = req.get_scene_item_list(scene).scene_items
        for item in items[scene]:
            transform = item["sceneItemTransform"]
            item["sceneItemTransform"] = {
                k: v for k, v in transform.items() if k not in SIZED_BY_CONTENT
            }
    return {
        "scenes": scenes,
        "inputs": inputs,
        "settings": {name: req.get_input_settings(name).input_settings for name, _ in inputs},
        "items": items,
    }


@pytest.mark.slow
def test_obs_setup_is_idempotent_and_status_reports_what_is_there(
    obs_peer: Any,
    obs_client: Any,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv("BF_TEST_OBS_PASSWORD", obs_peer.password)
    config = tmp_path / "daemon.yaml"
    config.write_text(
        "model: {id: tiny}\n"
        "sinks: [null]\n"
        "api: {token: dock-secret}\n"
        "obs:\n"
        f"  port: {obs_peer.port}\n"
        "  password_env: BF_TEST_OBS_PASSWORD\n"
        "  scene_presets: {'Scene C': warm, 'Setup Show': cool}\n"
        "  item_presets: {'Setup Warm': warm, 'Setup Bypass': bypass}\n"
        "  controls_scene: Setup Controls\n"
        "  status_source: Setup Status\n"
        "  output_source: Setup Output\n"
        "  output_url: udp://127.0.0.1:23999\n"
    )
    cli = ("--config", str(config))
    code, out, _ = run_cli(capsys, "obs", "status", *cli)
    assert code == 3 and "MISSING" in out and "OBS 29" in out

    before = obs_snapshot(obs_client)
    code, out, _ = run_cli(capsys, "obs", "setup", "--dry-run", *cli)
    assert code == 0 and "would create scene 'Setup Controls'" in out
    assert obs_snapshot(obs_client) == before

    code, out, _ = run_cli(capsys, "obs", "setup", *cli)
    assert code == 0, out
    assert "Custom Browser Docks, add the URL http://127.0.0.1:8760/?token=dock-secret" in out
    print(f"\nfirst `obs setup`:\n{out}")
    first = obs_snapshot(obs_client)
    assert {"Setup Controls", "Setup Show"} <= set(first["scenes"])
    assert ("Setup Output", "ffmpeg_source") in first["inputs"]
    assert first["settings"]["Setup Output"]["input"] == "udp://127.0.0.1:23999"
    for scene in ("Scene C", "Setup Show"):
        assert first["items"][scene][0]["sourceName"] == "Setup Output"  # at the back
    controls = {i["sourceName"]: i["sceneItemEnabled"] for i in first["items"]["Setup Controls"]}
    assert controls == {"Setup Warm": False, "Setup Bypass": False, "Setup Status": True}

    code, out, _ = run_cli(capsys, "obs", "setup", *cli)
    assert code == 0 and "nothing to do" in out
    assert obs_snapshot(obs_client) == first

    code, out, _ = run_cli(capsys, "obs", "status", *cli)
    assert code == 0 and "MISSING" not in out and "udp://127.0.0.1:23999" in out

    config.write_text(config.read_text().replace(":23999", ":23998"))  # the daemon moved
    code, out, _ = run_cli(capsys, "obs", "setup", *cli)
    assert code == 0 and "update media source 'Setup Output'" in out
    moved = obs_client.get_input_settings("Setup Output").input_settings
    assert moved["input"] == "udp://127.0.0.1:23998" and moved["buffering_mb"] == 0
    code, out, _ = run_cli(capsys, "obs", "setup", *cli)
    assert "nothing to do" in out


MIC, MIC_2 = "BF Mic", "BF Mic 2"  # OBS may hold a removed input's name a while


def sync_offset(req: Any, name: str = MIC) -> int:
    return req.get_input_audio_sync_offset(name).input_audio_sync_offset


def saved_sync_ms(obs_peer: Any, name: str) -> int:
    """The sync offset OBS saved for input ``name`` in its scene collection file."""
    path = obs_peer.home / ".config/obs-studio/basic/scenes/CI.json"
    sources = json.loads(path.read_text())["sources"]
    return next(s.get("sync", 0) for s in sources if s["name"] == name) // 1_000_000


@pytest.mark.slow
@pytest.mark.peers
def test_sync_audio_follows_the_lasting_video_delay_and_is_put_back_at_stop(
    obs_peer: Any,
    obs_client: Any,
    obs_mapping: dict,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OBS is real (offsets are read back from it; it closes and comes back mid-run). The
    delay is the daemon's own number (``Daemon.delay.delay``), so a callable the test sets
    stands in for it; tests/test_daemon_obs.py runs the same with the whole daemon."""
    import obsws_python

    monkeypatch.setattr(obs_bridge, "SYNC_RETRY_S", 0.3)  # retry unusable inputs often
    caplog.set_level(logging.INFO, logger=obs_bridge.__name__)
    obs_client.set_current_program_scene("Scene A")
    # a microphone as OBS has it on Linux (no sound server here: it captures nothing)
    obs_client.create_input("Scene C", MIC, "pulse_input_capture", {}, True)
    req = obs_client
    try:
        req.set_input_audio_sync_offset(MIC, 37)  # the user's own offset, before the daemon
        delay: list[float | None] = [None]
        names = [MIC, "No Such Mic", "BF Status"]  # BF Status is a text source: no audio
        settings = obs_settings(obs_mapping | {"sync_audio": names}, tmp_path)
        bridge = ObsBridge(settings, RecordingCommands(), delay=lambda: delay[0]).start()
        try:
            wait_until(lambda: bridge.state == "connected", 10, "the bridge to connect")
            time.sleep(0.6)  # no frame went out yet: nothing is set
            assert sync_offset(req) == 37 and bridge.text == "connected"

            delay[0] = 0.4204
            wait_until(lambda: sync_offset(req) == 420, 5, "offset +420 ms")
            wanted = "connected, BF Mic sync +420 ms, 'No Such Mic' missing, 'BF Status' no audio"
            wait_until(lambda: bridge.text == wanted, 5, f"state text {wanted!r}")
            delay[0] = 0.4196  # the same whole ms: not set again
            time.sleep(0.6)
            delay[0] = 0.18
            wait_until(lambda: sync_offset(req) == 180, 5, "offset +180 ms")
            wait_until(lambda: "BF Mic sync +180 ms" in bridge.text, 5, "state text +180 ms")

            # OBS closes cleanly, saving +180 ms as the mic's offset, and comes back: that
            # value is the daemon's, not the user's, and must not be taken as the original
            req.disconnect()
            assert obs_peer.close()
            wait_until(lambda: bridge.state != "connected", 5, "the bridge to let go")
            assert saved_sync_ms(obs_peer, MIC) == 180  # what OBS comes back with
            delay[0] = 0.25  # moved while OBS was away
            obs_peer.launch()
            obs_peer.wait_ready()
            req = obsws_python.ReqClient(**obs_peer.connection(), timeout=5)
            wait_until(lambda: sync_offset(req) == 250, 10, "offset +250 ms after reconnect")
            wait_until(lambda: "BF Mic sync +250 ms" in bridge.text, 5, "state text +250 ms")
        finally:
            bridge.stop()
        assert sync_offset(req) == 37  # the user's offset is back
        assert bridge.text == "stopped"
    finally:
        req.remove_input(MIC)
        if req is not obs_client:
            req.disconnect()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    missing = [m for m in warnings if "No Such Mic" in m]
    assert len(missing) == 1, missing  # said once, though retried many times
    assert "OBS has no input named 'No Such Mic'" in missing[0] and MIC in missing[0]
    assert [m for m in warnings if "'BF Status' has" in m] == [
        "obs.sync_audio: OBS input 'BF Status' has no audio; left alone, tried again every 0.3 s"
    ]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    sets = [m for m in infos if m.startswith(f"OBS input '{MIC}'")]
    print("\n".join(sets))
    assert sets[0] == (
        f"OBS input '{MIC}': audio sync offset +420 ms (the video delay; +37 ms is put back "
        "at exit)"
    )
    assert sets[1] == (
        f"OBS input '{MIC}': audio sync offset +180 ms (was +420 ms: the video delay changed)"
    )
    assert sets[2] == (  # after the reconnect: the original is still the user's +37 ms
        f"OBS input '{MIC}': audio sync offset +250 ms (the video delay; +37 ms is put back "
        "at exit)"
    )
    assert sets[3:] == [f"OBS input '{MIC}': audio sync offset put back to +37 ms"]


@pytest.mark.slow
@pytest.mark.peers
def test_sync_audio_stopped_while_obs_is_down_says_what_to_put_back(
    obs_peer: Any,
    obs_client: Any,
    obs_mapping: dict,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The delay callable stands in for the daemon's number, as above; OBS is real."""
    import obsws_python

    obs_client.create_input("Scene C", MIC_2, "pulse_input_capture", {}, True)
    obs_client.set_input_audio_sync_offset(MIC_2, -20)
    settings = obs_settings(obs_mapping | {"sync_audio": [MIC_2]}, tmp_path)
    bridge = ObsBridge(settings, RecordingCommands(), delay=lambda: 0.3).start()
    try:
        wait_until(lambda: sync_offset(obs_client, MIC_2) == 300, 10, "offset +300 ms")
        obs_client.disconnect()
        obs_peer.kill()
        wait_until(lambda: bridge.state == "disconnected", 5, "state disconnected")
    finally:
        bridge.stop()
        obs_peer.launch()
        obs_peer.wait_ready()
        req = obsws_python.ReqClient(**obs_peer.connection(), timeout=5)
        if MIC_2 in [i["inputName"] for i in req.get_input_list().inputs]:
            req.remove_input(MIC_2)
        req.disconnect()
    assert (
        f"could not restore the sync offset of OBS input '{MIC_2}' to -20 ms: OBS is not "
        "connected; set it back in OBS (Edit > Advanced Audio Properties)"
    ) in caplog.text
