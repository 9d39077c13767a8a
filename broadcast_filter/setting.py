"""Declaring a setting once: on the dataclass field that holds it.

A setting's default, allowed range, help text and whether it needs a model reload are
written on its field (:func:`setting`); the YAML schema in
:mod:`broadcast_filter.control.config` is derived from the fields and their type hints
(``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None``, nested dataclasses).
This module imports nothing heavy, so settings can be declared next to torch-free code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, field
from typing import Any


def setting(
    default: Any = MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    help: str = "",
    lo: float | None = None,
    hi: float | None = None,
    open_lo: bool = False,
    empty: bool = False,
    required: bool = False,
    reload: bool = False,
    live: bool = False,
    check: Callable[[Any], Any] | None = None,
    repr: bool = True,
) -> Any:
    """A dataclass field with schema metadata.

    ``lo``/``hi`` bound numbers (``open_lo``: strictly above ``lo``); ``empty`` allows empty
    text; ``required`` makes the YAML key mandatory although the dataclass has a default;
    ``reload``: changing it needs a model reload; ``live``: a control surface may change it
    on the running preset; ``check`` replaces the check derived from the type hint.
    """
    metadata = {
        "help": help,
        "lo": lo,
        "hi": hi,
        "open_lo": open_lo,
        "empty": empty,
        "required": required,
        "reload": reload,
        "live": live,
        "check": check,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=repr)
    return field(default=default, metadata=metadata, repr=repr)
