"""Strict masking: frozen weights stay bit-identical under Adam momentum and weight decay."""

import torch

from erase.training import MaskedOptimizer


def train(optimizer, param, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        (param.square().sum() + param.sum()).backward()
        optimizer.step()


def test_frozen_entries_never_move_even_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8, 8))
    adam = torch.optim.AdamW([param], lr=0.1, weight_decay=0.5)
    optimizer = MaskedOptimizer(adam, {param: torch.ones_like(param, dtype=torch.bool)})
    train(optimizer, param, 5)  # momentum builds up everywhere
    mask = torch.rand(8, 8) > 0.5
    optimizer.set_masks({param: mask})
    frozen, trained = param[~mask].clone(), param[mask].clone()
    train(optimizer, param, 5)
    assert torch.equal(param[~mask], frozen)
    assert (param[mask] != trained).all()


def test_plain_adamw_would_have_moved_them():
    """The leak the wrapper closes: masking only the gradient still moves frozen weights."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8, 8))
    adam = torch.optim.AdamW([param], lr=0.1, weight_decay=0.5)
    train(adam, param, 5)
    mask = torch.rand(8, 8) > 0.5
    frozen = param[~mask].clone()
    for _ in range(5):
        adam.zero_grad()
        (param.square().sum() + param.sum()).backward()
        param.grad.mul_(mask)
        adam.step()
    assert (param[~mask] != frozen).all()
