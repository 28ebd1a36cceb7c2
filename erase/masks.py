"""Boolean weight masks: top-k selections, multi-concept fusion by votes, and bit packing for patches."""

from __future__ import annotations

import math

import torch

from .errors import EraseError


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of `values` (k ≥ 1), exactly.

    A full selection over millions of entries is the costliest step of FIA's scoring. A sample's quantile (4096
    random positions, fixed seed; a stride could meet the row length and see a few columns only) gives a bound that
    at least k entries reach, and the selection runs over those entries only. Where the bound misses (fewer than k
    reach it), the whole tensor is selected from: the result never depends on the sample.
    """
    flat = values.flatten()
    if flat.numel() >= 1 << 16:
        picks = torch.randint(flat.numel(), (4096,), generator=torch.Generator().manual_seed(0))
        sample = flat[picks.to(flat.device)]
        rank = max(0, sample.numel() - math.ceil(sample.numel() * 1.5 * k / flat.numel()) - 8)
        candidates = flat[flat >= _kthvalue(sample, rank + 1)]
        if candidates.numel() >= k:
            flat = candidates
    return _kthvalue(flat, flat.numel() - k + 1)


def _kthvalue(flat: torch.Tensor, j: int) -> torch.Tensor:
    """The j-th smallest of a 1-d tensor, on its device (MPS has no kthvalue: there it runs on the CPU)."""
    return torch.kthvalue(flat.cpu() if flat.device.type == "mps" else flat, j).values.to(flat.device)


BLOCK_ROWS = 64
"""Rows of a weight worked on together where a pass would read a tensor many times: FIA's S_t, step counts and A
of a block, or a row's statistics, stay in the CPU's cache (about 3x faster on one thread than whole-layer passes)."""


class KthLargest:
    """The k-th largest of values ≥ 0 that arrive block by block, exactly, with only a bracket of them kept.

    A random sample of the values (from `sample`, out of `numel`) brackets the k-th largest by [lo, hi] with a wide
    margin: each block adds its count above hi and its entries inside the bracket, and the answer is the
    (k − above)-th largest of those. Without a sample the bracket is every positive value. `value()` is None where
    the bracket missed (an unlucky sample): the caller then selects from all values, so the result never depends on
    the sample.
    """

    def __init__(self, k: int, sample: torch.Tensor | None = None, numel: int = 0) -> None:
        self.k, self.above, self.inside = k, 0, []
        self.lo, self.hi = 0.0, math.inf  # lo 0: the positive values (a k-th largest among fewer is 0)
        if sample is not None:
            ordered = sample.float().sort(descending=True).values.tolist()
            expected = k * len(ordered) / numel  # the k-th largest's rank among the sample
            spread = 4 * math.sqrt(expected) + 8  # four binomial standard deviations, and some
            if 1 <= (upper := math.floor(expected - spread)) <= len(ordered):
                self.hi = ordered[upper - 1]
            if (lower := math.ceil(expected + spread)) <= len(ordered):
                self.lo = ordered[lower - 1]

    def see(self, block: torch.Tensor) -> None:
        candidates = block[(block.sign() if self.lo == 0 else at_least(block, self.lo)).bool()]
        over = above(candidates, self.hi)
        self.above += int(over.sum())
        self.inside.append(candidates[~over.bool()])

    def value(self) -> torch.Tensor | None:
        inside, needed = torch.cat(self.inside), self.k - self.above
        if needed <= 0:
            return None  # k values or more lie above hi
        if inside.numel() < needed:
            return inside.new_zeros(()) if self.lo == 0 else None  # fewer than k positive values: the k-th is 0
        return _kthvalue(inside, inside.numel() - needed + 1)


def above(values: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """1.0 where values > threshold, else 0.0. Float arithmetic (x − t > 0 exactly where x > t): on a CPU several
    times faster than a comparison into booleans, which the selections make millions of."""
    return (values - threshold).sign_().clamp_min_(0)


def at_least(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """0.0 where values < threshold, else 1.0 or 2.0 (as above(): true where nonzero)."""
    return (values - threshold).sign_().add_(1)


def row_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k largest entries of every row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(k, dim=1).indices, True)


def layer_topk_mask(scores: torch.Tensor, k: int, kth: torch.Tensor | None = None) -> torch.Tensor:
    """True at the k largest entries of the whole tensor (`kth`: their k-th largest, where known). A threshold where
    no tie straddles it (a top-k over millions of entries costs several selections); where one does, topk picks
    among the tied entries as it always did."""
    mask = scores >= (kth_largest(scores, k) if kth is None else kth)
    if torch.count_nonzero(mask) == k:
        return mask
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    return mask.scatter_(0, scores.flatten().topk(k).indices, True).view_as(scores)


def row_draws(weight: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per masked entry (row-major order) from N(mean, std) of its row's unmasked entries (weight and mask
    [rows, cols]); drawn on the generator's device (the CPU: the same values on every device)."""
    blocks = [_kept_mean_std(weight[start : start + BLOCK_ROWS], mask[start : start + BLOCK_ROWS])
              for start in range(0, weight.shape[0], BLOCK_ROWS)]
    mean, std = torch.cat([m for m, _ in blocks]), torch.cat([s for _, s in blocks])
    rows = torch.repeat_interleave(torch.arange(len(mask), device=mask.device), mask.sum(1))  # row-major order
    return torch.randn(len(rows), generator=generator).to(weight.device) * std[rows] + mean[rows]


def _kept_mean_std(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kept = (~mask).float()
    count_kept = kept.sum(1).clamp_min(1)
    mean = (weight * kept).sum(1) / count_kept
    return mean, ((weight - mean[:, None]).square() * kept).sum(1).div(count_kept).sqrt()


def count(ratio: float, total: int) -> int:
    """max(1, int(ratio · total)): how many entries a ratio selects (docs/methods.md)."""
    return max(1, int(ratio * total))


def global_topk_masks(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """True at the top `fraction` of all entries of all tensors, ranked together (SalUn's one global ranking).

    The threshold is found by bisection on counts, so the tensors are never concatenated (the whole SD UNet's
    scores would need another 3.4 GB); ties at the threshold are all kept.
    """
    k = count(fraction, sum(s.numel() for s in scores.values()))
    low = min(float(s.min()) for s in scores.values())
    high = max(float(s.max()) for s in scores.values())
    for _ in range(64):  # invariant: at least k entries are >= low; fewer than k are > high
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if sum(int((s >= middle).sum()) for s in scores.values()) >= k:
            low = middle
        else:
            high = middle
    return {name: s >= low for name, s in scores.items()}


def drop_and_regrow(mask: torch.Tensor, importance: torch.Tensor, fraction: float) -> torch.Tensor:
    """RigL-style update at fixed density: the n = max(1, int(fraction · active)) active entries of least importance
    leave the mask and as many inactive entries of most importance join it."""
    n = min(count(fraction, int(mask.sum())), int((~mask).sum()))
    if n == 0:
        return mask
    flat, score = mask.flatten().clone(), importance.flatten().float()
    drop = torch.where(flat, score, torch.inf).topk(n, largest=False).indices
    grow = torch.where(flat, -torch.inf, score).topk(n).indices
    flat[drop], flat[grow] = False, True
    return flat.view_as(mask)


class Votes:
    """Streaming vote counts of per-concept masks: memory stays one counter tensor per layer, whatever C is."""

    def __init__(self, shapes: dict[str, torch.Size], device: torch.device) -> None:
        self.concepts = 0
        self.counts = {name: torch.zeros(shape, dtype=torch.int32, device=device) for name, shape in shapes.items()}

    def add(self, masks: dict[str, torch.Tensor]) -> None:
        for name, mask in masks.items():
            self.counts[name] += mask
        self.concepts += 1

    def sum_across_processes(self) -> None:
        """Every process's votes and concept count summed (an all-reduce): each then fuses the same masks."""
        import torch.distributed as dist

        for name in sorted(self.counts):
            dist.all_reduce(self.counts[name])
        total = torch.tensor([self.concepts], device=next(iter(self.counts.values())).device)
        dist.all_reduce(total)
        self.concepts = int(total.item())

    def threshold(self, alpha: float | None) -> int:
        """τ = ceil(α · C); None means a plain union (τ = 1)."""
        if alpha is None:
            return 1
        return math.ceil(round(alpha * self.concepts, 9))  # round: 0.07 · 100 must give 7, not 8

    def fuse(self, alpha: float | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(prune, keep) masks: prune where 0 < s < τ, keep (concept-agnostic) where s ≥ τ.

        When τ ≤ 1 — a single concept, or a plain union — the whole union is pruned: otherwise one concept would
        prune nothing (the reference implementation's bug).
        """
        tau = self.threshold(alpha)
        prune, keep = {}, {}
        for name, s in self.counts.items():
            if tau <= 1:
                prune[name], keep[name] = s > 0, torch.zeros_like(s, dtype=torch.bool)
            else:
                prune[name], keep[name] = (s > 0) & (s < tau), s >= tau
        return prune, keep


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, 8 entries a byte (little-endian bit order), flattened and zero-padded."""
    flat = mask.flatten().to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != math.ceil(numel / 8):
        raise EraseError(f"packed mask has {packed.numel()} bytes for shape {list(shape)}: the patch is corrupt, "
                         "export it again")
    bits = (packed[:, None] & _BIT_WEIGHTS.to(packed.device)) > 0
    return bits.flatten()[:numel].view(shape)
