"""The method registry: a method's name → its config dataclass and the function that runs it.

A method's run(pipe, concepts, catalog, config, progress, denoiser_fingerprint) returns (edit, record): the edit applies
to the denoiser (the UNet or transformer), the record (prompts, timesteps, per-layer statistics, timings) goes into
erase.json. denoiser_fingerprint is the denoiser's as erase() computed it (seconds on SD1.5): methods that key caches by
the model take it from there. Methods reach the model's parts through its family's adapter (erase.families).
"""

from __future__ import annotations

from ..registry import Entry as Method
from ..registry import Registry

METHODS = Registry("method")
register = METHODS.register
get_method = METHODS.lookup


def check_concepts(method: str, concepts: list, config) -> None:
    """Refuse, before any work, concepts that `method` cannot erase with this config (its optional check)."""
    spec = get_method(method)
    if spec.check is not None:
        spec.check(concepts, config)


from . import conceptprune, dynamic, esd, fia, salun, uce  # noqa: F401  (registration)

__all__ = ["METHODS", "Method", "check_concepts", "get_method", "register"]
