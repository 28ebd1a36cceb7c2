"""Shared parts of the training-based methods (METHODS.md §3–4).

Strict masking: a weight outside the trainable mask must not move at all. Masking the gradient is not enough —
Adam's momentum from earlier steps and decoupled weight decay still move it (the reference dynamic-mask code
has exactly this leak) — so the frozen entries are written back after every optimiser step.
"""

from __future__ import annotations

import torch
from torch import nn


class MaskedOptimizer:
    """Wrap any torch optimiser so that, per parameter, only the entries where `masks` is True ever change.

    masks: parameter → bool tensor of its shape (True = trainable). set_masks() changes them (dynamic masks);
    the entries it freezes keep the values they have at that moment.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, masks: dict[nn.Parameter, torch.Tensor]) -> None:
        self.optimizer = optimizer
        self.set_masks(masks)

    @torch.no_grad()
    def set_masks(self, masks: dict[nn.Parameter, torch.Tensor]) -> None:
        self.masks = {p: m.to(p.device, torch.bool) for p, m in masks.items()}
        self._frozen = {p: p[~m].clone() for p, m in self.masks.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in self.masks.items():
            if p.grad is not None:
                p.grad.mul_(m)  # frozen entries add nothing to the optimiser's state
        self.optimizer.step()
        for p, m in self.masks.items():
            p[~m] = self._frozen[p]
