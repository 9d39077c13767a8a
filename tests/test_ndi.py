"""NDI sink and source in separate processes over loopback (unicast discovery via a config)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
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


def sources_seen_include(name: str, timeout: float = 60.0) -> str:
    """Look for a source that does not exist until the error lists ``name`` among the
    sources seen (a sender process starting on a busy machine takes a while to announce)."""
    deadline = time.monotonic() + timeout
    while True:
        with pytest.raises(MediaError, match="sources seen") as error:
            missing = NdiSource("ndi:no-such-source", discovery_timeout=2.0, extra_ips="127.0.0.1")
            next(missing.frames())
        if f"({name})" in str(error.value) or time.monotonic() > deadline:
            return str(error.value)


@pytest.mark.slow
@pytest.mark.peers
def test_ndi_sender_process_to_receiver_full_resolution_and_rate(ndi_config):
    """From the first frame received to the last (the newest is never dropped), every frame
    arrives in order or is counted as dropped: by the sender's NdiSink (newest frame wins)
    or by the NDI receive queue (``NdiSource.dropped``). The rate comes from the metadata."""
    name = f"bf-test-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, PEERS, "ndi-send", "--name", name, "--frames", "210",
            "--size", "1280x720", "--fps", "30"]  # fmt: skip
    sender = peers.spawn(argv, env=ndi_config, stdout=subprocess.PIPE, text=True)
    try:
        assert re.search(rf"sources seen: .*\({name}\)", sources_seen_include(name))
        source = NdiSource(f"ndi:{name}", discovery_timeout=10.0, extra_ips="127.0.0.1")
        received = peers.Received()
        with pytest.raises(SourceLost, match="waiting for sender"):
            for frame in source.frames():
                received.add(frame.image)
        assert source.fps == 30
        receiver_dropped = source.dropped
        assert f"{receiver_dropped} dropped" in source.state or not receiver_dropped
        source.close()
        out, _ = sender.communicate(timeout=30)
        sender_dropped = json.loads(out.splitlines()[-1])["dropped"]
    finally:
        peers.stop_all()
    counters = received.counters
    first = counters[0]
    missing = sorted(set(range(first, 210)) - set(counters))
    print(f"\nNDI 1280x720: {len(counters)} frames from {first}, {len(missing)} missing; "
          f"dropped by the sender {sender_dropped}, by the receive queue {receiver_dropped}; "
          f"latency median {received.median():.1f} ms, p95 {received.p95():.1f} ms")  # fmt: skip
    assert received.sizes == {(1280, 720)}
    assert received.in_order() and received.duplicates() == [], received.gaps()
    assert counters[-1] == 209
    assert len(missing) <= sender_dropped + receiver_dropped, missing
    assert len(counters) >= 0.5 * (210 - first)
    assert received.median() < 10_000


def test_ndi_source_needs_a_name():
    with pytest.raises(MediaError, match="needs a source name"):
        NdiSource("ndi:")


@pytest.mark.slow
@pytest.mark.peers
def test_devices_lists_a_running_ndi_sender(ndi_config):
    """``devices`` runs as its own process: the NDI runtime reads NDI_CONFIG_DIR once per
    process, and earlier tests in this one already initialised it with another folder."""
    name = f"bf-devices-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, PEERS, "ndi-send", "--name", name, "--frames", "300",
            "--size", "64x64", "--fps", "30"]  # fmt: skip
    sender = peers.spawn(argv, env=ndi_config, stdout=subprocess.DEVNULL)
    devices = [sys.executable, "-m", "broadcast_filter.cli", "devices"]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the sender process needs a while to announce
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
