"""The diffusion core: StreamDiffusion on diffusers components, free of I/O.

The engine API is exported here; importing the package imports no torch (the settings in
:mod:`~broadcast_filter.diffusion.spec`, :mod:`~broadcast_filter.diffusion.schedule` and
:mod:`~broadcast_filter.diffusion.temporal_settings` are torch-free), each name's module is
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "Acceleration": "spec",
    "ModelSpec": "spec",
    "ref_kind": "spec",
    "check_t_index_list": "schedule",
    "strength_to_t_index_list": "schedule",
    "ModelBundle": "models",
    "ModelNotFoundError": "models",
    "load_models": "models",
    "accelerate": "accel",
    "warm_up": "accel",
    "OFFLINE_MODELS": "offline",
    "ensure_offline_model": "offline",
    "PromptEmbeds": "stream",
    "StreamConfig": "stream",
    "StreamPipeline": "stream",
    "SimilarityFilter": "similarity",
    "TemporalSettings": "temporal_settings",
    "TemporalState": "temporal",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
