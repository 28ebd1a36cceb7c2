"""The method registry: a method's name → its config dataclass and the function that runs it.

A method's run(pipe, concepts, catalog, config, progress) returns (edit, record): the edit applies to the UNet,
the record (prompts, timesteps, per-layer statistics, timings) goes into erase.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import EraseError


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    run: Callable
    summary: str
    masking: bool = False
    """Its edit zeroes weights under a sparse mask (no new values): not low-rank, so it has no LoRA export."""


METHODS: dict[str, Method] = {}


def register(name: str, config_class: type, summary: str, masking: bool = False):
    def decorator(run: Callable) -> Callable:
        METHODS[name] = Method(name, config_class, run, summary, masking)
        return run
    return decorator


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise EraseError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import conceptprune, dynamic, esd, fia, salun, uce  # noqa: E402,F401  (registration)
