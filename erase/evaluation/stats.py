"""The report's uncertainty and distribution distance: bootstrap intervals over images, KID on judge features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class Estimate:
    """A statistic of the images and its bootstrap replicates (the same statistic on each resampling)."""

    value: float
    replicates: np.ndarray

    def interval(self, confidence: float) -> list[float]:
        """The percentile bootstrap interval: the middle `confidence` share of the replicates."""
        tail = 50 * (1 - confidence)
        return [float(v) for v in np.percentile(self.replicates, [tail, 100 - tail])]


class Bootstrap:
    """Resamples the images behind each statistic (with replacement, `samples` times, from `seed`): the same
    seed gives the same intervals. Each group of images (one concept's, one role's) is resampled on its own."""

    def __init__(self, samples: int, seed: int) -> None:
        self.samples, self.rng = samples, np.random.default_rng(seed)

    def mean(self, values) -> Estimate | None:
        """The mean of per-image values (hits, scores, similarities; a list, array or tensor); None without any."""
        values = (values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)).astype(float)
        if not len(values):
            return None
        draws = self.rng.integers(0, len(values), size=(self.samples, len(values)))
        return Estimate(float(values.mean()), values[draws].mean(axis=1))


def combine(reduce: Callable, estimates: list[Estimate | None]) -> Estimate | None:
    """`reduce` (over axis 0) applied to the values and, replicate by replicate, to the replicates; None without
    estimates. The intervals of a summary then carry the resampling of every group it is made of."""
    estimates = [e for e in estimates if e is not None]
    if not estimates:
        return None
    return Estimate(float(reduce(np.array([e.value for e in estimates]))),
                    reduce(np.stack([e.replicates for e in estimates])))


def average(estimates: list[Estimate | None]) -> Estimate | None:
    return combine(lambda values: np.mean(values, axis=0), estimates)


def harmonic(values: np.ndarray) -> np.ndarray:
    """Harmonic mean over axis 0 (0 wherever one of the values is 0)."""
    with np.errstate(divide="ignore"):
        return np.where((values > 0).all(axis=0), len(values) / (1 / values).sum(axis=0), 0.0)


def kid(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Kernel inception distance between paired feature sets (x[i] and y[i] from one prompt and seed): the
    squared MMD with the cubic kernel (a·b/d + 1)³ of Bińkowski et al. (2018), estimated by Gretton et al.'s
    (2012) unbiased U-statistic over pairs i ≠ j. Leaving out the i = j terms keeps the pairing from biasing it,
    and identical sets give exactly 0. None with fewer than two pairs."""
    n, d = x.shape
    if n < 2:
        return None
    x, y = x.double(), y.double()
    h = sum(sign * (a @ b.T / d + 1) ** 3 for sign, a, b in ((1, x, x), (1, y, y), (-1, x, y), (-1, y, x)))
    return float((h.sum() - h.diagonal().sum()) / (n * (n - 1)))
