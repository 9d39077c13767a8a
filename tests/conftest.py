"""Shared fixtures: one thread for torch (2 shared cores), offline tiny models in a temp cache.

The tiny-model fixtures pin ``dtype: float32``: the tests that use them check the pipeline's
arithmetic against references at float32 tolerances, which must not depend on whether the
CPU running them has native bfloat16 (``dtype: auto`` would pick it there; see
tests/test_dtype_auto.py). End-to-end tests (daemon, CLI) keep ``auto``, the shipped default.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from obs_fixtures import *  # noqa: F403  (the real headless OBS peer: obs_peer, obs_client, ...)

torch.set_num_threads(1)


def require_tool(name: str) -> str:
    """Path of an executable a real-peer test needs: skipped locally when missing, but a
    failure under CI (``CI=true``), where ``.ci/run`` installs it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install it; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session", autouse=True)
def ndi_loopback_config(tmp_path_factory: pytest.TempPathFactory):
    """One NDI config for the whole session, set before any test runs: NDI reads it once per
    process, when its runtime starts, which is whichever test touches NDI first (``devices``
    lists NDI sources too), and the peers inherit it. Discovery is unicast to 127.0.0.1,
    multicast off: mDNS cannot run on loopback here."""
    folder = tmp_path_factory.mktemp("ndi-config")
    off = {"enable": False}
    config = {"ndi": {"networks": {"ips": "127.0.0.1", "discovery": ""},
                      "multicast": {"send": off, "recv": off}}}  # fmt: skip
    (folder / "ndi-config.v1.json").write_text(json.dumps(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NDI_CONFIG_DIR", str(folder))
        yield


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A per-session cache for offline models, so tests never touch the user's cache."""
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def tiny_models(model_cache: str):
    """The offline ``tiny`` model (full VAE), loaded through the normal loader."""
    from broadcast_filter.diffusion.models import load_models
    from broadcast_filter.diffusion.spec import ModelSpec

    return load_models(
        ModelSpec(id="tiny", device="cpu", dtype="float32", cache_dir=model_cache), progress=False
    )


@pytest.fixture(scope="session")
def tiny_models_taesd(model_cache: str):
    """The offline ``tiny`` model with its tiny autoencoder (deterministic encode)."""
    from broadcast_filter.diffusion.models import load_models
    from broadcast_filter.diffusion.spec import ModelSpec

    spec = ModelSpec(id="tiny", taesd="tiny", device="cpu", dtype="float32", cache_dir=model_cache)
    return load_models(spec, progress=False)
