"""``broadcast-filter`` as a user runs it: the demo as a real subprocess writing a real mp4
(decoded back with PyAV), SIGINT mid-run, exit codes, and the preset/device/doctor commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from broadcast_filter.cli import build_parser, main
from broadcast_filter.media.open import open_source

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
DEFAULT = ROOT / "configs" / "default.yaml"


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for CLI subprocesses: a private model cache, one torch thread."""
    cache = tmp_path_factory.mktemp("cli-cache")
    return {**os.environ, "BROADCAST_FILTER_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def cli(*args: str, cwd: Path, env: dict[str, str], timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "broadcast_filter.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.slow
def test_demo_writes_the_frames_asked_for_and_they_are_styled(tmp_path, cli_env):
    result = cli("run", "--config", str(DEMO), "--frames", "24", cwd=tmp_path, env=cli_env)
    assert result.returncode == 0, result.stderr
    frames = decode(tmp_path / "demo.mp4")
    assert len(frames) == 24
    assert all(f.shape == (128, 128, 3) for f in frames)
    with open_source(None, width=128, height=128, fps=15) as source:
        raw = [f.image for _, f in zip(range(24), source.frames(), strict=False)]
    difference = np.mean(
        [np.abs(o.astype(int) - r.astype(int)).mean() for o, r in zip(frames, raw, strict=True)]
    )
    assert difference > 20  # not the input passed through
    assert "[neon_edges | styled]" in result.stderr and "latency p50" in result.stderr
    assert "frames out 24 (--frames 24)" in result.stderr
    assert "warm-up" in result.stderr  # the progress bar
    # a normal start prints only our lines: no library notes or bars we cannot act on
    for noise in ("torchvision", "block_out_channels", "Loading weights", "Please verify"):
        assert noise not in result.stderr, noise
    threads = max(1, (os.cpu_count() or 1) - 1)  # every core but one: the daemon says so
    ours = ("[neon_edges |", "warm-up", "model demo + TAESD demo: dtype float32 (as configured)",
            f"model on the CPU: {threads} torch thread")  # fmt: skip
    assert all(
        line.strip().startswith(ours)
        for line in result.stderr.replace("\r", "\n").splitlines()
        if line.strip()
    ), result.stderr


def start_running(cwd: Path, env: dict[str, str], *outputs: str) -> tuple[subprocess.Popen, list]:
    """Start the demo with these outputs and return once frames are styled and flowing."""
    argv = [sys.executable, "-m", "broadcast_filter.cli", "run", "--config", str(DEMO)]
    for output in outputs:
        argv += ["--output", output]
    proc = subprocess.Popen(
        [*argv, "--duration", "120"], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True
    )
    running = threading.Event()
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "[neon_edges | styled]" in line:
                running.set()

    threading.Thread(target=read, daemon=True).start()
    if not running.wait(90):
        proc.kill()
        raise AssertionError("".join(lines))
    time.sleep(2.0)  # let frames flow into the outputs
    return proc, lines


@pytest.mark.slow
def test_sigint_mid_run_exits_within_two_seconds_with_a_playable_file(tmp_path, cli_env):
    out = tmp_path / "live.mp4"
    proc, lines = start_running(tmp_path, cli_env, str(out))
    try:
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(lines)
    assert elapsed < 2.0
    frames = decode(out)
    assert len(frames) >= 10 and frames[0].shape == (128, 128, 3)


@pytest.mark.slow
def test_a_second_sigint_exits_at_once_leaving_a_playable_file_and_no_child(tmp_path, cli_env):
    """Impatient operators press Ctrl-C twice: the process goes at once, the mp4 (written as
    fragments) still plays, and the UDP output's encoder process goes with it."""
    import psutil

    out = tmp_path / "live.mp4"
    proc, _ = start_running(tmp_path, cli_env, str(out), "udp://127.0.0.1:29999")
    children = psutil.Process(proc.pid).children(recursive=True)
    try:
        assert children, "the UDP output should run in a child process"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=5)
        _, alive = psutil.wait_procs(children, timeout=5)
    finally:
        proc.kill()
    assert alive == [], f"left behind: {alive}"
    frames = decode(out)
    assert len(frames) >= 10 and frames[0].shape == (128, 128, 3)


def test_a_broken_config_exits_2_naming_file_line_and_field(tmp_path, cli_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  id: tiny\nfps: fast\nsinks: [null]\n")
    result = cli("run", "--config", str(bad), cwd=tmp_path, env=cli_env)
    assert result.returncode == 2
    assert f"{bad}:3: fps: expected a number >= 1 and <= 240, got 'fast'" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2(tmp_path, capsys, monkeypatch):
    assert main(["run", "--config", str(DEMO), "--frames", "0"]) == 2
    assert "--frames must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["run", "--bogus", "3"])
    assert info.value.code == 2
    monkeypatch.chdir(tmp_path)  # no configs/default.yaml here
    assert main(["run"]) == 2
    assert "try: broadcast-filter run --config configs/demo.yaml" in capsys.readouterr().err


def test_an_unknown_start_preset_exits_2_listing_the_known_ones(tmp_path, cli_env):
    result = cli("run", "--config", str(DEMO), "--preset", "anime", cwd=tmp_path, env=cli_env)
    assert result.returncode == 2
    assert "--preset anime: no such preset (known in " in result.stderr
    assert "blue_night, neon_edges" in result.stderr


@pytest.mark.slow
def test_a_source_that_cannot_open_is_a_runtime_failure_exit_1(tmp_path, cli_env):
    result = cli(
        "run",
        "--config",
        str(DEMO),
        "--source",
        str(tmp_path / "missing.mp4"),
        "--frames",
        "3",
        cwd=tmp_path,
        env=cli_env,
    )
    assert result.returncode == 1
    assert "error:" in result.stderr and "missing.mp4" in result.stderr
    assert "Traceback" not in result.stderr


def test_presets_validate_and_list(tmp_path, capsys):
    assert main(["presets", "validate", "--config", str(DEFAULT)]) == 0
    assert "anime.yaml: ok (style)" in capsys.readouterr().out
    broken = tmp_path / "broken.yaml"
    broken.write_text("prompt: x\ncfg_type: half\n")
    assert main(["presets", "validate", str(broken)]) == 2
    assert f"{broken}:2: cfg_type: expected one of none, self, initialize, full, got 'half'" in (
        capsys.readouterr().out
    )
    assert main(["presets", "list", "--config", str(DEFAULT)]) == 0
    listing = capsys.readouterr().out
    assert " * anime" in listing and "passthrough (engine bypassed)" in listing
    assert "[needs reload: model Lykon/dreamshaper-8]" in listing


def test_help_covers_every_command_and_the_first_steps(capsys):
    parser = build_parser()
    text = parser.format_help()
    for word in ("run", "presets", "devices", "doctor", "obs", "configs/demo.yaml", "Ctrl-C"):
        assert word in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    run_help = capsys.readouterr().out
    for option in ("--config", "--preset", "--source", "--output", "--frames", "--duration"):
        assert option in run_help


def test_devices_and_doctor_print_actionable_lines(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "cameras:" in out and "virtual cameras:" in out and "sink forms" in out
    assert main(["doctor", "--config", str(DEMO)]) == 0
    out = capsys.readouterr().out
    assert "ok    torch " in out
    assert "accelerator" in out and "virtual camera" in out
    assert "model demo: offline model" in out
