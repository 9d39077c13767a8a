"""Third-party noise, silenced deliberately and in one place.

A start of ``broadcast-filter run`` should print only our own lines. Two libraries print
on every start what a user can do nothing about: transformers notes that torchvision is
absent (its image processors fall back to Pillow; the filter uses none) and draws a bar
for loading the text encoder's few weights (instant). Everything else they log still
shows. Call :func:`quiet_third_party` before the model libraries are imported.
"""

from __future__ import annotations

import logging


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_third_party() -> None:
    """Drop transformers' torchvision notes and its weight-loading bar (idempotent)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger("transformers")  # makes sure its handler exists
    transformers_logging.disable_progress_bar()
    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _DropMessages) for f in handler.filters):
            handler.addFilter(_DropMessages("requires torchvision"))
