"""Fusion by votes (METHODS §1) on hand-made masks, the top-k selections, and bit packing."""

import pytest
import torch

from erase.masks import Votes, drop_and_regrow, global_topk_masks, layer_topk_mask, pack_bits, row_topk_mask, unpack_bits


def votes_from(counts: list[int], concepts: int) -> Votes:
    """A one-layer Votes where entry i is in the first counts[i] of `concepts` masks."""
    counts_t = torch.tensor(counts)
    votes = Votes({"layer": counts_t.shape}, torch.device("cpu"))
    for c in range(concepts):
        votes.add({"layer": counts_t > c})
    return votes


def test_single_concept_prunes_its_whole_mask():
    votes = votes_from([0, 1, 1, 0], concepts=1)
    prune, keep = votes.fuse(alpha=0.6)
    assert prune["layer"].tolist() == [False, True, True, False]
    assert not keep["layer"].any()


def test_two_concepts_prune_single_votes_and_keep_shared():
    votes = votes_from([0, 1, 2], concepts=2)  # τ = ceil(0.6 · 2) = 2
    prune, keep = votes.fuse(alpha=0.6)
    assert votes.threshold(0.6) == 2
    assert prune["layer"].tolist() == [False, True, False]
    assert keep["layer"].tolist() == [False, False, True]


def test_ten_concepts_prune_below_tau_six():
    counts = list(range(11))  # s = 0..10
    votes = votes_from(counts, concepts=10)
    prune, keep = votes.fuse(alpha=0.6)
    assert votes.threshold(0.6) == 6
    assert [s for s, p in zip(counts, prune["layer"].tolist()) if p] == [1, 2, 3, 4, 5]
    assert [s for s, k in zip(counts, keep["layer"].tolist()) if k] == [6, 7, 8, 9, 10]


def test_union_prunes_every_vote():
    prune, _ = votes_from([0, 1, 3], concepts=3).fuse(alpha=None)
    assert prune["layer"].tolist() == [False, True, True]


@pytest.mark.parametrize("alpha,concepts,tau", [(0.07, 100, 7), (0.8, 5, 4), (1.0, 3, 3), (0.3, 3, 1)])
def test_threshold_is_exact_ceil(alpha, concepts, tau):
    assert votes_from([1], concepts).threshold(alpha) == tau


def test_row_and_layer_topk():
    scores = torch.tensor([[1.0, 5.0, 3.0], [9.0, 2.0, 8.0]])
    assert row_topk_mask(scores, 1).tolist() == [[False, True, False], [True, False, False]]
    assert layer_topk_mask(scores, 2).tolist() == [[False, False, False], [True, False, True]]


@pytest.mark.parametrize("shape", [(3, 5), (8, 8), (1,), (7, 3, 2)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_global_topk_ranks_all_tensors_together():
    torch.manual_seed(0)
    scores = {"a": torch.rand(30, 7), "b": torch.rand(11) * 3, "c": torch.rand(4, 4, 3)}
    masks = global_topk_masks(scores, 0.25)
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int(0.25 * flat.numel())
    expected = flat >= flat.topk(k).values[-1]
    assert torch.equal(torch.cat([m.flatten() for m in masks.values()]), expected)
    assert masks["b"].float().mean() > masks["a"].float().mean()  # the larger scores win wherever they are


def test_drop_and_regrow_keeps_density_and_swaps_by_importance():
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    importance = torch.tensor([5.0, 0.1, 4.0, 0.2, 9.0, 0.0, 8.0, 0.3])
    new = drop_and_regrow(mask, importance, 0.5)
    assert new.sum() == mask.sum()
    assert new.tolist() == [True, False, True, False, True, False, True, False]
