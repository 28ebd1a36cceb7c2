"""Adversarial recovery: how much of an erased concept an attacker can bring back (docs/evaluation.md, robustness).

A registry of attack kinds, one file per kind (as erase/methods): a kind's run(pipe, edit, targets, config,
progress) returns, for each target (a held-out prompt of an erased concept, a seed, and the original model's final
latents of it), a dict whose "prompt" is the attacked prompt (and whatever else the report should show about it),
and the edit of the original UNet to generate the attacked prompts with: the erasure's own (prompt attacks) or
the weights the attack made of it (revival). erase/attacks/core.py does the rest for every kind: the targets, the
generation, the judge's verdict; erase/attacks/report.py the report.
"""

from __future__ import annotations

from ..registry import Registry

ATTACKS = Registry("attack kind")
register = ATTACKS.register
get_attack = ATTACKS.lookup

from . import inversion, prompt, revival  # noqa: F401  (registration)
from .core import AttackSettings, Target, attack
from .report import AttackReport

__all__ = ["ATTACKS", "AttackReport", "AttackSettings", "Target", "attack", "get_attack"]
