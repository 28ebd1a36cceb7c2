"""Registries of named implementations, each with its settings dataclass: the erasure methods (erase/methods) and
the attack kinds (erase/attacks). Each implementation registers itself from its own file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import EraseError


@dataclass(frozen=True)
class Entry:
    name: str
    config_class: type
    run: Callable
    summary: str
    check: Callable | None = None
    """Optional: refuses, before any work, what the implementation cannot do: a method's check(concepts, config)
    (UCE: a concept that is its own anchor), an attack kind's check(pipe, prompts, config)."""
    masking: bool = False
    """A method whose edit masks weights under a sparse mask (zeros, or noise that carries no concept): not
    low-rank, so no LoRA export."""


class Registry(dict):
    """name → Entry; `what` names the kind of thing in the error for an unknown name."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def register(self, name: str, config_class: type, summary: str, check: Callable | None = None,
                 masking: bool = False):
        def decorator(run: Callable) -> Callable:
            self[name] = Entry(name, config_class, run, summary, check, masking)
            return run
        return decorator

    def lookup(self, name: str) -> Entry:
        if name not in self:
            raise EraseError(f"unknown {self.what} {name!r}: choose one of {', '.join(sorted(self))}")
        return self[name]
