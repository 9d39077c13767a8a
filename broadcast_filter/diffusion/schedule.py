"""The denoising schedule a preset chooses, without torch: levels, strength, cfg modes.

StreamDiffusion runs a few levels (``t_index_list``) of an N-step LCM schedule; a preset
names them directly or through an img2img ``strength``. The stream pipeline and the preset
checks both use these definitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

#: Steps of the schedule the levels index into (StreamDiffusion's default).
NUM_INFERENCE_STEPS = 50
#: Most levels a stream runs (the pipeline draws this many fixed noise tensors).
MAX_LEVELS = 4
#: Levels when a preset names none: two steps, close to the input.
DEFAULT_T_INDEX = (32, 45)

CfgType = Literal["none", "self", "initialize", "full"]
CFG_TYPES: tuple[str, ...] = get_args(CfgType)


def check_t_index_list(
    levels: Sequence[int], num_inference_steps: int = NUM_INFERENCE_STEPS
) -> tuple[int, ...]:
    """``levels`` as a tuple if it is 1 to :data:`MAX_LEVELS` strictly increasing indices of
    the schedule; else ``ValueError`` saying what is allowed."""
    n = num_inference_steps
    allowed = (
        f"expected a list of 1 to {MAX_LEVELS} strictly increasing whole numbers "
        f"in 0..{n - 1} (larger = closer to the input)"
    )
    if isinstance(levels, str | bytes) or not isinstance(levels, Sequence):
        raise ValueError(allowed)
    values = list(levels)
    if not 1 <= len(values) <= MAX_LEVELS:
        raise ValueError(allowed)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
        raise ValueError(allowed)
    if any(not 0 <= i < n for i in values) or values != sorted(set(values)):
        raise ValueError(allowed)
    return tuple(values)


def strength_to_t_index_list(
    strength: float, num_inference_steps: int = NUM_INFERENCE_STEPS, steps: int = 1
) -> tuple[int, ...]:
    """Map an img2img strength in ``(0, 1]`` to ``steps`` levels of an N-step schedule.

    Strength 1 starts from pure noise (index 0); smaller strengths start later (less noise);
    the remaining levels are spread evenly towards the end of the schedule.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if not 1 <= steps <= MAX_LEVELS:
        raise ValueError(f"steps must be 1..{MAX_LEVELS}, got {steps}")
    first = min(round(num_inference_steps * (1.0 - strength)), num_inference_steps - steps)
    span = num_inference_steps - first
    return tuple(first + (span * i) // steps for i in range(steps))
