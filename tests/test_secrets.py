"""Secrets never leak: a real run with an OBS password, an RTMP stream key, an SRT
passphrase and an API token configured leaves none of them in any log line, status line, error or in
``doctor`` output; YAML is loaded safely (preset paths: test_guard.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broadcast_filter.control.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PASSWORD, KEY, PASSPHRASE = "obs-pw-9f3a1c", "live_key_7d2e55", "srt-pass-4b8c0e"
TOKEN = "api-token-3e9d71"


def secret_config(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "configs" / "presets", tmp_path / "presets")
    sinks = [f"rtmp://127.0.0.1:9/live/{KEY}", str(tmp_path / "out.mp4")]
    if shutil.which("srt-live-transmit"):
        sinks.append(f"srt://127.0.0.1:9?mode=caller&passphrase={PASSPHRASE}")
    path = tmp_path / "secret.yaml"
    path.write_text(
        "model: {id: tiny, taesd: tiny, device: cpu}\nresolution: [64, 64]\nfps: 10\n"
        "source: {url: testsrc}\nsinks:\n"
        + "".join(f"  - {s!r}\n" for s in sinks)
        + f"presets: {{folder: presets, start: anime}}\n"
        f"obs: {{host: 127.0.0.1, port: 9, password: {PASSWORD}}}\n"
        f"api: {{bind: 0.0.0.0, port: 0, token: {TOKEN}}}\n"
    )
    return path


@pytest.mark.slow
def test_a_run_and_doctor_with_secrets_configured_never_print_them(tmp_path):
    config = secret_config(tmp_path)
    cmd = [sys.executable, "-m", "broadcast_filter.cli"]
    run = subprocess.run(
        [*cmd, "run", "--config", str(config), "--frames", "30"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    doctor = subprocess.run(
        [*cmd, "doctor", "--config", str(config)], capture_output=True, text=True, timeout=120
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text(config.read_text().replace("fps: 10", "fps: [oops"))
    error = subprocess.run(
        [*cmd, "run", "--config", str(broken)], capture_output=True, text=True, timeout=60
    )
    text = "\n".join(p.stdout + p.stderr for p in (run, doctor, error))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "frames out 30" in run.stderr
    assert "api: dock and API on http://127.0.0.1:" in run.stderr  # shown without the token
    from broadcast_filter.control.config import SinkSettings
    from broadcast_filter.runtime.build import open_sinks

    sinks = open_sinks([SinkSettings(f"rtmp://127.0.0.1:9/live/{KEY}")], 64, 64, 10)
    try:  # the name the status line and stats() use for the sink
        assert [name for name, _ in sinks] == ["rtmp://127.0.0.1:9/live/****"]
    finally:
        sinks[0][1].close()
    for secret in (PASSWORD, KEY, PASSPHRASE, TOKEN):
        assert secret not in text


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\nsinks: [null]\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml:1"):
        load_config(path)
