"""ESD on a tiny pipeline: what it trains, determinism, and that erase() leaves the
pipeline as it was. Whether it makes the mini model forget is measured by erase_lab/mini_erasure_gate.py."""

import pytest
import torch

import erase
from erase.methods.esd import trainable

FAST = {"steps": 3, "sample_steps": 4, "lr": 1e-3}


@pytest.mark.parametrize("train", ["esd-x", "esd-u"])
def test_esd_edits_only_its_train_set_and_restores_the_pipeline(pipe, train):
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    result = erase.erase(pipe, "church", method="esd", progress=False, train=train, **FAST)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
    assert all(p.requires_grad for p in pipe.unet.parameters())
    names = set(trainable(pipe.unet, train))
    assert result.edit.masks and set(result.edit.masks) <= names
    assert all((".attn2." in n) == (train == "esd-x") for n in result.edit.masks)
    assert len(result.record["training_curve"]) == 3 and result.record["config"]["train"] == train
    with result.applied():
        moved = [n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])]
    assert moved and set(moved) <= names


def test_same_seed_same_weights(pipe):
    first = erase.erase(pipe, "church", method="esd", progress=False, **FAST)
    second = erase.erase(pipe, "church", method="esd", progress=False, **FAST)
    assert first.record["training_curve"] == second.record["training_curve"]
    assert all(torch.equal(second.edit.values[n], v) for n, v in first.edit.values.items())


def test_bad_train_set(pipe):
    with pytest.raises(erase.EraseError, match="train='esd-z' is unknown"):
        erase.erase(pipe, "church", method="esd", progress=False, train="esd-z")
