"""NDI sink and source in separate processes over loopback (unicast discovery via a config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import peers
import pytest

from broadcast_filter.media.base import SINKS, SOURCES, MediaError, SourceLost

ndi = pytest.importorskip("NDIlib", reason="ndi-python is not installed (pip install '.[ndi]')")

from broadcast_filter.media.ndi import NdiSink, NdiSource  # noqa: E402

PEERS = str(Path(__file__).with_name("peers.py"))


@pytest.fixture
def ndi_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """NDI_CONFIG_DIR listing 127.0.0.1, since mDNS cannot run on loopback here."""
    off = {"enable": False}
    config = {"ndi": {"networks": {"ips": "127.0.0.1", "discovery": ""},
                      "multicast": {"send": off, "recv": off}}}  # fmt: skip
    (tmp_path / "ndi-config.v1.json").write_text(json.dumps(config))
    monkeypatch.setenv("NDI_CONFIG_DIR", str(tmp_path))
    return dict(os.environ)


def test_ndi_kinds_are_registered():
    assert SOURCES["ndi"] is NdiSource and SINKS["ndi"] is NdiSink


@pytest.mark.slow
def test_ndi_sender_process_to_receiver_full_resolution_and_rate(ndi_config):
    name = f"bf-test-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, PEERS, "ndi-send", "--name", name, "--frames", "210",
            "--size", "1280x720", "--fps", "30"]  # fmt: skip
    sender = subprocess.Popen(argv, env=ndi_config)
    try:
        with pytest.raises(MediaError, match=rf"sources seen: .*\({name}\)"):
            next(
                NdiSource(
                    "ndi:no-such-source", discovery_timeout=2.0, extra_ips="127.0.0.1"
                ).frames()
            )
        source = NdiSource(f"ndi:{name}", discovery_timeout=5.0, extra_ips="127.0.0.1")
        received = peers.Received()
        arrivals: list[float] = []
        with pytest.raises(SourceLost, match="waiting for sender"):
            for frame in source.frames():
                received.add(frame.image)
                arrivals.append(frame.captured_at)
        assert source.fps == 30
        source.close()
    finally:
        peers.stop(sender)
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    print(f"\nNDI 1280x720: {len(received.counters)} frames at {rate:.1f} fps, latency median "
          f"{received.median():.1f} ms, p95 {received.p95():.1f} ms")  # fmt: skip
    assert received.sizes == {(1280, 720)}
    assert received.gaps() == [] and len(received.counters) >= 90
    assert received.counters[-1] == 209
    assert 27 <= rate <= 33
    assert received.median() < 250


def test_ndi_source_needs_a_name():
    with pytest.raises(MediaError, match="needs a source name"):
        NdiSource("ndi:")


@pytest.mark.slow
def test_devices_lists_a_running_ndi_sender(ndi_config):
    """``devices`` runs as its own process: the NDI runtime reads NDI_CONFIG_DIR once per
    process, and earlier tests in this one already initialised it with another folder."""
    name = f"bf-devices-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, PEERS, "ndi-send", "--name", name, "--frames", "300",
            "--size", "64x64", "--fps", "30"]  # fmt: skip
    sender = subprocess.Popen(argv, env=ndi_config)
    devices = [sys.executable, "-m", "broadcast_filter.cli", "devices"]
    try:
        for _ in range(3):  # the sender process needs a moment to announce itself
            done = subprocess.run(devices, env=ndi_config, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            out = done.stdout
            if f"({name})" in out:
                break
    finally:
        peers.stop(sender)
    print(out.split("NDI sources")[1].split("\n\n")[0])
    assert f"({name})" in out
    assert f"also ndi:{name}" in out
