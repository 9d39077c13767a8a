"""Pytest fixtures: one real, headless OBS Studio per test session (scripts/headless_obs.py).

Import them into ``tests/conftest.py`` (``from obs_fixtures import *``). Tests that use them
are skipped, with the reason, when OBS, Xvfb or xdotool is not installed; under CI
(``CI`` set, as in tests/conftest.py's ``require_tool``, or ``REQUIRE_OBS=1``) that is a failure.

The OBS scene collection is what a user has after ``broadcast-filter obs setup`` plus
binding hotkeys: scenes mapped to presets, a controls scene whose hidden items are hotkey
targets (F6/F7/F8 bound to "Show '<item>'"), and a status text source.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["obs_client", "obs_mapping", "obs_peer"]

_HARNESS = Path(__file__).resolve().parent.parent / "scripts" / "headless_obs.py"
_spec = importlib.util.spec_from_file_location("headless_obs", _HARNESS)
assert _spec is not None and _spec.loader is not None
headless_obs = importlib.util.module_from_spec(_spec)
sys.modules["headless_obs"] = headless_obs
_spec.loader.exec_module(headless_obs)

CONTROLS = "BF Controls"
STATUS = "BF Status"
#: hotkey target item -> (preset or "bypass", the X key bound to its "Show" hotkey)
HOTKEY_ITEMS = {"BF Warm": ("warm", "F6"), "BF Cool": ("cool", "F7"), "BF Bypass": ("bypass", "F8")}
SCENE_PRESETS = {"Scene A": "warm", "Scene B": "cool"}


def obs_test_collection() -> dict:
    """Scene A/B mapped to presets, Scene C unmapped, the controls scene with hotkeys."""
    sources = [
        headless_obs.color_source("Background"),
        headless_obs.text_source(STATUS, "broadcast_filter: waiting"),
        *(headless_obs.color_source(item, 0xFF00C000, 64, 36) for item in HOTKEY_ITEMS),
    ]
    scenes = {
        "Scene A": [("Background", True), (STATUS, True)],
        "Scene B": [("Background", True)],
        "Scene C": [],
        CONTROLS: [(item, False) for item in HOTKEY_ITEMS],
    }
    hotkeys = {
        CONTROLS: {
            f"libobs.show_scene_item.{item}": [f"OBS_KEY_{key}"]
            for item, (_, key) in HOTKEY_ITEMS.items()
        }
    }
    return headless_obs.scene_collection(scenes, sources, hotkeys)


@pytest.fixture(scope="session")
def obs_peer() -> Iterator[Any]:
    """A running headless OBS (``headless_obs.HeadlessObs``) for the whole session."""
    missing = headless_obs.is_available()
    if missing:
        if os.environ.get("CI") or os.environ.get("REQUIRE_OBS") == "1":
            pytest.fail(f"OBS tests are required here but cannot run ({missing})")
        pytest.skip(f"real OBS tests need obs-studio, xvfb and xdotool ({missing})")
    obs = headless_obs.HeadlessObs(obs_test_collection(), password="bf-test-secret")
    obs.start()
    yield obs
    obs.stop()


@pytest.fixture
def obs_client(obs_peer: Any) -> Iterator[Any]:
    """An obsws-python ``ReqClient`` on the session OBS (OBS is restarted if it died)."""
    import obsws_python

    if obs_peer.obs is None or obs_peer.obs.poll() is not None:
        obs_peer.launch()
        obs_peer.wait_ready()
    client = obsws_python.ReqClient(**obs_peer.connection(), timeout=5)
    yield client
    client.disconnect()


@pytest.fixture
def obs_mapping(obs_peer: Any) -> dict[str, Any]:
    """The daemon config's ``obs:`` section for the session OBS."""
    return {
        "host": "127.0.0.1",
        "port": obs_peer.port,
        "password": obs_peer.password,
        "scene_presets": dict(SCENE_PRESETS),
        "item_presets": {item: target for item, (target, _) in HOTKEY_ITEMS.items()},
        "controls_scene": CONTROLS,
        "status_source": STATUS,
        "status_interval_s": 0.5,
        "reconnect_max_s": 1.0,
    }
