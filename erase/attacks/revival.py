"""Revival attack, after "Roots Beneath the Cut" (Zhang et al., CVPR 2026, arXiv 2603.06640): bring a pruned
concept back from the erased checkpoint alone, with no data and no training.

Pruning leaves exact zeros, which trained weights almost never hold: they show where the concept lived (a whole
zero column or row is a dead unit the model was shipped with, not a pruned weight, and is left alone). Each
target layer's zeros are treated as missing entries and completed from the rest of the matrix (SoftImpute:
iterative soft-thresholded SVD, Mazumder et al., 2010); the completion's signs are kept where its magnitudes are
in the top `top_ratio` of the completed entries (the rest stay zero), and those entries get magnitudes at least
the largest of their row (neuron max scaling), drawn from the row's own distribution. The attacked images are the
concept's plain prompts generated with these revived weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..config import check_choice, check_positive, check_positive_ints, check_ratio
from ..edits import MaskEdit
from ..families import family_of
from ..masks import row_draws
from . import register
from .core import AttackSettings, Target

LOCATIONS = ("zeros", "patch")


@dataclass
class RevivalAttackConfig(AttackSettings):
    """Revival settings: which layers are completed, where the pruned entries are taken from, and the completion."""

    target: str = "ffn"
    """The Linear layers whose pruned entries are completed: 'ffn', the model family's feed-forward down-projections
    (the paper: a UNet's ff.net.2), or a glob over the denoiser's module names."""
    locations: str = "zeros"
    """'zeros': the erased weights' exact zeros outside all-zero columns and rows (an attacker who has the
    checkpoint); 'patch': the erasure's own
    masks (an attacker who also has patch.safetensors, which lists every edited location)."""
    rank: int = 50
    """Rank of each SVD of the completion (SoftImpute's max_rank)."""
    iterations: int = 100
    """SoftImpute iterations at most."""
    tolerance: float = 1e-4
    """SoftImpute stops when the missing entries change by less than this, relative to their norm."""
    top_ratio: float = 0.6
    """Share of the completed entries, by magnitude, whose signs are kept (the paper's 0.6); the rest stay zero."""

    def validate(self) -> None:
        super().validate()
        check_choice("locations", self.locations, LOCATIONS)
        check_positive_ints(self, "rank", "iterations")
        check_positive("tolerance", self.tolerance, "1e-4")
        check_ratio("top_ratio", self.top_ratio)


def pruned_zeros(weight: torch.Tensor) -> torch.Tensor:
    """The exact zeros of a weight [out, in, ...] that are not part of an all-zero column or row (a dead unit)."""
    zero = weight.flatten(1) == 0
    return (zero & ~zero.all(0, keepdim=True) & ~zero.all(1, keepdim=True)).view_as(weight)


def soft_impute(weight: torch.Tensor, missing: torch.Tensor, rank: int, iterations: int,
                tolerance: float) -> torch.Tensor:
    """`weight` [rows, cols] with its `missing` entries completed by iterative soft-thresholded SVD (fancyimpute's
    SoftImpute: column-mean start, shrinkage = the largest singular value / 50, rank-`rank` randomized SVD)."""
    observed = (~missing).float()
    column_mean = (weight * observed).sum(0) / observed.sum(0).clamp_min(1)
    filled = torch.where(missing, column_mean.expand_as(weight), weight)
    shrinkage = torch.linalg.matrix_norm(filled, ord=2) / 50
    rank = min(rank, *weight.shape)
    for _ in range(iterations):
        u, s, v = torch.svd_lowrank(filled, q=rank, niter=2)
        low_rank = (u * (s - shrinkage).clamp_min(0)) @ v.T
        change = (low_rank - filled)[missing].norm() / filled[missing].norm().clamp_min(1e-12)
        filled = torch.where(missing, low_rank, weight)
        if change < tolerance:
            break
    return filled


def revived(weight: torch.Tensor, missing: torch.Tensor, config: RevivalAttackConfig,
            generator: torch.Generator) -> torch.Tensor:
    """The revived values of the missing entries (in order): completion signs where its magnitudes are in the top
    `top_ratio`, else zero, times max(|draw from N(mean, std) of the row's kept entries|, the row's largest |w|)."""
    completed = soft_impute(weight, missing, config.rank, config.iterations, config.tolerance)[missing]
    magnitude = completed.abs()
    dropped = int((1 - config.top_ratio) * magnitude.numel())
    sign = completed.sign()
    if dropped:
        sign[magnitude <= magnitude.kthvalue(dropped).values] = 0
    row_max = weight.abs().masked_fill(missing, 0).amax(1)[missing.nonzero()[:, 0]]
    return sign * torch.maximum(row_draws(weight, missing, generator).abs(), row_max)


@register("revival", RevivalAttackConfig, "pruned entries completed from the erased weights (matrix completion, "
          "top-k signs, neuron max scaling; Roots Beneath the Cut)")
def run(pipe, edit, targets: list[Target], config: RevivalAttackConfig,
        progress: bool = True) -> tuple[list[dict], MaskEdit]:
    """The revived weights as an edit of the original UNet (the erasure's edit with its pruned entries revived),
    and for each target its plain prompt and how many weights were revived."""
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    layers = family.targets(denoiser, config.target)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    params = dict(denoiser.named_parameters())
    masks, values, count = {}, {}, 0
    with edit.applied_to(denoiser), torch.no_grad():
        names = sorted({*edit.masks, *(f"{name}.weight" for name in layers)})
        for name in tqdm(names, desc="revival", unit="layer", disable=not progress):
            weight = params[name].detach()
            missing = torch.zeros_like(weight, dtype=torch.bool)
            if name.removesuffix(".weight") in layers:
                missing = pruned_zeros(weight) if config.locations == "zeros" else \
                    edit.masks.get(name, missing).to(weight.device)
            new = weight.clone()
            if missing.any():
                new[missing] = revived(weight.float(), missing, config, generator).to(weight.dtype)
            mask = missing | edit.masks[name].to(weight.device) if name in edit.masks else missing
            if mask.any():
                masks[name], values[name] = mask, new[mask]
            count += int(missing.sum())
    found = [{"prompt": t.prompt, "words": f"{count} weights revived", "revived": count} for t in targets]
    return found, MaskEdit(masks, values)
