"""Fusion by votes (METHODS §1) on hand-made masks, the top-k selections, and bit packing."""

import pytest
import torch

from erase.masks import (
    KthLargest,
    Votes,
    drop_and_regrow,
    global_topk_masks,
    kth_largest,
    layer_topk_mask,
    pack_bits,
    row_draws,
    row_topk_mask,
    unpack_bits,
)
from erase.saliency import SAMPLE, fia_layer_mask


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


def kthvalue_reference(values: torch.Tensor, k: int) -> torch.Tensor:
    """The full selection kth_largest replaced (scores before the sampled bound)."""
    flat = values.flatten()
    return torch.kthvalue(flat, flat.numel() - k + 1).values


@pytest.mark.parametrize("ratio", [1e-6, 0.001, 0.05, 0.3, 0.999])
def test_kth_largest_is_exactly_the_full_selection(ratio):
    torch.manual_seed(0)
    saliency = torch.randn(640, 2560).abs() * torch.randn(2560).clamp_min(0)  # |W| · margin: half the columns 0
    ties = torch.randint(0, 5, (300, 300)).float()  # few distinct values
    adversarial = torch.zeros(1 << 17)
    picks = torch.randint(adversarial.numel(), (4096,), generator=torch.Generator().manual_seed(0))
    adversarial[picks] = 1.0 + torch.rand(4096)  # only the sampled entries are large: the bound misses for large k
    for values in (saliency, ties, adversarial, torch.randn(1000)):
        k = max(1, int(ratio * values.numel()))
        assert torch.equal(kth_largest(values, k), kthvalue_reference(values, k))


def fia_reference(weight: torch.Tensor, margin: torch.Tensor, r1: float, r2: float) -> torch.Tensor:
    """FIA's mask by its definition on whole tensors: every S_t built, full selections, topk for both top-k's."""
    abs_w = weight.abs()
    s = [abs_w * m if margin.dim() == 2 else m for m in margin]
    k = max(1, int(r1 * weight.numel()))
    frequency = sum((s_t > kthvalue_reference(s_t, k)).float() for s_t in s)
    mean_s = abs_w * margin.mean(0) if margin.dim() == 2 else margin.mean(0)
    a = 0.5 * mean_s / mean_s.max() + 0.5 * frequency / len(s)
    k_layer = max(1, int(r2 * a.numel()))
    layer = torch.zeros(a.numel(), dtype=torch.bool).scatter_(0, a.flatten().topk(k_layer).indices, True)
    return row_topk_mask(a, max(1, int(r2 * a.shape[1]))) & layer.view_as(a) & (a > 0)


@pytest.mark.parametrize("r1", [0.001, 0.05, 0.4])
def test_fia_layer_mask_is_bit_identical_to_the_full_selections(r1):
    """The masks FIA writes: the blocked, bracketed selections give what whole-tensor selections give (rank-1 and
    full S_t; layers above and below the sampling size; steps where fewer weights are excited than selected)."""
    torch.manual_seed(1)
    for rows, columns in ((320, 1280), (40, 96)):
        weight, margin = torch.randn(rows, columns), torch.randn(10, columns).clamp_min(0)
        margin[3:6, 2:] = 0
        assert torch.equal(fia_layer_mask(weight, margin, r1, 0.01), fia_reference(weight, margin, r1, 0.01))
    weight, margin = torch.randn(64, 2048), torch.randn(3, 64, 2048).clamp_min(0)
    assert torch.equal(fia_layer_mask(weight, margin, r1, 0.02), fia_reference(weight, margin, r1, 0.02))
    misleading = torch.zeros(320 * 1280)  # only the sampled entries are nonzero: every bracket misses
    picks = torch.randint(misleading.numel(), (SAMPLE,), generator=torch.Generator().manual_seed(0))
    misleading[picks] = torch.rand(SAMPLE) + 1
    weight, margin = misleading.view(320, 1280), torch.rand(4, 1280)
    assert torch.equal(fia_layer_mask(weight, margin, r1, 0.01), fia_reference(weight, margin, r1, 0.01))


def test_kth_largest_of_blocks_is_exact_when_its_sample_misleads():
    """A bracket from a sample that misses the k-th largest says so (None); one that holds it gives it exactly."""
    torch.manual_seed(3)
    values = torch.rand(200_000)
    honest, misled = KthLargest(5000, values[:4096], values.numel()), KthLargest(5000, values[:4096] / 10, values.numel())
    for block in values.split(30_000):
        honest.see(block)
        misled.see(block)
    assert torch.equal(honest.value(), kthvalue_reference(values, 5000)) and misled.value() is None
    sparse = torch.zeros(100_000)
    sparse[:10] = torch.rand(10) + 1  # fewer positive values than k: the k-th largest is 0
    unsampled = KthLargest(50)
    unsampled.see(sparse)
    assert unsampled.value() == 0


def test_row_draws_use_each_rows_unmasked_mean_and_std():
    torch.manual_seed(4)
    weight, mask = torch.randn(150, 300), torch.rand(150, 300) < 0.05
    draws = row_draws(weight, mask, torch.Generator().manual_seed(0))
    kept = (~mask).float()
    mean = (weight * kept).sum(1) / kept.sum(1)
    std = ((weight - mean[:, None]).square() * kept).sum(1).div(kept.sum(1)).sqrt()
    rows = mask.nonzero()[:, 0]
    expected = torch.randn(len(rows), generator=torch.Generator().manual_seed(0)) * std[rows] + mean[rows]
    assert torch.equal(draws, expected)


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.2])
def test_layer_topk_mask_is_the_topk_selection_with_ties_or_without(ratio):
    torch.manual_seed(2)
    for scores in (torch.randn(640, 2560), torch.randint(0, 50, (400, 400)).float()):
        k = max(1, int(ratio * scores.numel()))
        reference = torch.zeros(scores.numel(), dtype=torch.bool).scatter_(0, scores.flatten().topk(k).indices, True)
        assert torch.equal(layer_topk_mask(scores, k), reference.view_as(scores))
