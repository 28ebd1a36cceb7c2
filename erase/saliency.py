"""Per-concept masks from captured statistics: FIA's contrastive saliency and ConceptPrune's skilled neurons.

Both work one layer at a time. With column statistics, the saliency S_t = |W| · c_t is a rank-1 broadcast:
only one step's S of one layer exists at a time, and nothing is written to disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .capture import CaptureSettings, ColumnStats, capture, cpu_threads
from .concepts import Catalog, Concept
from .config import check_choice, check_positive_int
from .edits import MaskEdit
from .families import Target, family_of
from .masks import BLOCK_ROWS, KthLargest, Votes, above, count, kth_largest, layer_topk_mask, row_draws, row_topk_mask


def contrastive_margin(concept: ColumnStats, base: ColumnStats, name: str) -> torch.Tensor:
    """c = max(0, mean_concept − mean_base − std_base), per captured step: [T, C_in] (or [T, C_out, C_in])."""
    return (concept.mean(name) - base.mean(name) - base.std(name)).clamp_min(0)


SAMPLE = 16384
"""Entries sampled (fixed seed) to bracket each selection's threshold before the blocks are read (KthLargest)."""


class StepScores:
    """S_t of one layer, a block of rows at a time: S_t = |W| · c_t for a margin [T, C_in] (a rank-1 broadcast), or
    the margin itself for a margin [T, C_out, C_in] (cosine scores already carry |W|). No whole S_t is ever built."""

    def __init__(self, weight: torch.Tensor, margin: torch.Tensor) -> None:
        self.weight, self.margin, self.rank1 = weight.detach(), margin, margin.dim() == 2
        self.mean_margin = margin.mean(0)
        self.steps, self.shape, self.numel = margin.shape[0], weight.shape, weight.numel()

    def blocks(self):
        """(rows, |W| of those rows or None, their margins [T, C_in] or [T, rows, C_in], their mean margin)."""
        for start in range(0, self.shape[0], BLOCK_ROWS):
            rows = slice(start, start + BLOCK_ROWS)
            if self.rank1:
                yield rows, self.weight[rows].abs().float(), self.margin, self.mean_margin
            else:
                yield rows, None, self.margin[:, rows], self.mean_margin[rows]

    def sample(self) -> tuple | None:
        """The same at SAMPLE random entries (1-D): (|W| or None, margins [T, SAMPLE], mean margin); None for a small
        layer, whose every positive value is then bracketed."""
        if self.numel < 4 * SAMPLE:
            return None
        flat = torch.randint(self.numel, (SAMPLE,), generator=torch.Generator().manual_seed(0)).to(self.weight.device)
        row, column = flat // self.shape[1], flat % self.shape[1]
        if self.rank1:
            return self.weight[row, column].abs().float(), self.margin[:, column], self.mean_margin[column]
        return None, self.margin[:, row, column], self.mean_margin[row, column]

    def step(self, abs_w: torch.Tensor | None, margins: torch.Tensor, t: int) -> torch.Tensor:
        return abs_w * margins[t] if self.rank1 else margins[t]

    def mean(self, abs_w: torch.Tensor | None, mean_margin: torch.Tensor) -> torch.Tensor:
        return abs_w * mean_margin if self.rank1 else mean_margin


def step_thresholds(scores: StepScores, sample: tuple | None, k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """τ_t, the k-th largest of each S_t, and the peak of mean_t S_t: one pass over the blocks for all T steps."""
    selections = [KthLargest(k) if sample is None else KthLargest(k, scores.step(*sample[:2], t), scores.numel)
                  for t in range(scores.steps)]
    peak = torch.zeros((), device=scores.weight.device)
    for _, abs_w, margins, mean_margin in scores.blocks():
        for t, selection in enumerate(selections):
            selection.see(scores.step(abs_w, margins, t))
        peak = torch.maximum(peak, scores.mean(abs_w, mean_margin).max())
    taus = [selection.value() for selection in selections]
    for t, tau in enumerate(taus):
        if tau is None:  # the sample's bracket missed: select from the whole S_t
            taus[t] = kth_largest(torch.cat([scores.step(abs_w, margins, t).flatten()
                                             for _, abs_w, margins, _ in scores.blocks()]), k)
    return taus, peak


def sensitivity(scores: StepScores, abs_w: torch.Tensor | None, margins: torch.Tensor, mean_margin: torch.Tensor,
                taus: list[torch.Tensor], peak: torch.Tensor) -> torch.Tensor:
    """A = ½ · norm(mean_t S_t) + ½ · mean_t 1[S_t > τ_t] of a block of rows (or of the sample)."""
    frequency = sum(above(scores.step(abs_w, margins, t), tau) for t, tau in enumerate(taus))
    mean_s = scores.mean(abs_w, mean_margin)
    strength = mean_s / peak if peak > 0 else mean_s
    return 0.5 * strength + 0.5 * frequency / scores.steps


def fia_layer_mask(weight: torch.Tensor, margin: torch.Tensor, r1: float, r2: float) -> torch.Tensor:
    """The weights in their row's top-k and the layer's top-K of A (k, K from r2), with A > 0.

    A = ½ · norm(mean_t S_t) + ½ · mean_t 1[S_t > τ_t], τ_t the k-th largest S_t with k = max(1, int(r1 · numel)).
    Two passes over the blocks of rows: the first finds every τ_t and the peak, the second builds A, its row
    top-k and the layer's threshold.
    """
    scores = StepScores(weight, margin)
    sample = scores.sample()
    taus, peak = step_thresholds(scores, sample, count(r1, scores.numel))
    k_row, k_layer = count(r2, scores.shape[1]), count(r2, scores.numel)
    top = KthLargest(k_layer) if sample is None else \
        KthLargest(k_layer, sensitivity(scores, *sample, taus, peak), scores.numel)
    a = torch.empty(scores.shape, device=margin.device)
    in_row_top = torch.empty(scores.shape, dtype=torch.bool, device=margin.device)
    for rows, *block in scores.blocks():
        a[rows] = sensitivity(scores, *block, taus, peak)
        in_row_top[rows] = row_topk_mask(a[rows], k_row)
        top.see(a[rows])
    return in_row_top & layer_topk_mask(a, k_layer, top.value()) & (a > 0)


def fia_concept_mask(layers: dict[str, Target], concept: ColumnStats, base: ColumnStats,
                     r1: float, r2: float) -> dict[str, torch.Tensor]:
    """Concept-sensitive weights per layer: in their row's top-k and the layer's top-K of A (k, K from r2).

    Entries with A = 0 never enter: a weight the concept does not excite more than its base serves no concept,
    even in a layer where fewer than K entries are salient.
    """
    return {name: fia_layer_mask(layer.weight, contrastive_margin(concept, base, name), r1, r2)
            for name, layer in layers.items()}


def conceptprune_concept_mask(layers: dict[str, Target], concept: ColumnStats, base: ColumnStats,
                              skill_ratio: float) -> dict[str, torch.Tensor]:
    """Skilled weights: at some captured step, in the row's top-(skill_ratio · C_in) of |W_ij| · ||X_j|| for the
    concept prompts, and scoring higher for the concept than for the base prompts (norms pooled over prompts)."""
    masks = {}
    for name, layer in layers.items():
        abs_w = layer.weight.detach().abs().float()
        concept_norm, base_norm = concept.rms(name), base.rms(name)
        k = count(skill_ratio, abs_w.shape[1])
        skilled = torch.zeros_like(abs_w, dtype=torch.bool)
        for t in range(concept_norm.shape[0]):
            score = abs_w * concept_norm[t]
            skilled |= row_topk_mask(score, k) & (score > abs_w * base_norm[t])
        masks[name] = skilled
    return masks


FILLS = ("zeros", "noise")


@dataclass
class MaskingConfig(CaptureSettings):
    """Settings shared by the training-free masking methods."""

    target: str = "ffn"
    """The Linear layers to score and mask: 'ffn', the model family's feed-forward down-projections (a UNet's
    `*ff.net.2`; SD3's `ff` and `ff_context`; Flux's double-block feed-forwards and the MLP columns of its single
    blocks' `proj_out`; any transformer's diffusers FeedForward outputs), or a glob over the denoiser's module
    names such as '*ff.net.2'."""
    prompts_per_concept: int | None = None
    """Prompt pairs per concept (the first fillers of its kind); None uses every filler."""
    fill: str = "noise"
    """What the masked weights become: 'noise' (default): per row, draws from the normal distribution of the row's
    unmasked weights (seeded by `seed`); or 'zeros' (pruning as published). Exact zeros tell an attacker where the
    concept lived, and the revival attack (erase.attack kind 'revival') completes them; noise leaves no zeros to
    find, and forgets and keeps as zeros do (BENCHMARKS.md, "Miniature world: revival")."""

    def validate(self) -> None:
        super().validate()
        if self.prompts_per_concept is not None:
            check_positive_int("prompts_per_concept", self.prompts_per_concept)
        check_choice("fill", self.fill, FILLS)


ConceptMask = Callable[[dict[str, Target], ColumnStats, ColumnStats, Concept], dict[str, torch.Tensor]]


def erase_with_masks(pipe, concepts: list[Concept], catalog: Catalog, config: MaskingConfig, concept_mask: ConceptMask,
                     alpha: float | None, faithful_cosine: bool = False, progress: bool = True) -> tuple[MaskEdit, dict]:
    """capture → per-concept mask → votes → fused prune mask, one concept at a time (memory flat in C).

    Base prompts are shared by every concept of a kind, so their statistics are captured once per prompt set.
    Launched as several processes (torchrun, accelerate launch), each captures a contiguous share of the concepts
    and the votes are summed across processes before fusion: every process ends with the one-process result.
    """
    from accelerate import PartialState

    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    state = PartialState(cpu=denoiser.device.type == "cpu")  # as the Trainer's Accelerator: gloo on CPU
    layers = family.targets(denoiser, config.target)
    votes, base_stats = Votes({name: layer.weight.shape for name, layer in layers.items()}, denoiser.device), {}
    record: dict = {"prompts": {}, "concept_masks": {}, "timesteps": [],
                    "sampler": {"scheduler": type(pipe.scheduler).__name__, "guidance": family.guidance(pipe),
                                "guidance_scale": config.guidance_scale, "steps": config.steps}}
    timings = {"capture_s": 0.0, "scoring_s": 0.0}
    with state.split_between_processes(concepts) as mine:
        for concept in tqdm(mine, desc="concepts", unit="concept", disable=not progress or len(mine) <= 1
                            or not state.is_main_process):
            pairs = catalog.prompt_pairs(concept, config.prompts_per_concept)
            concept_prompts, base_prompts = [p for p, _ in pairs], [b for _, b in pairs]
            started = time.perf_counter()
            if tuple(base_prompts) not in base_stats:
                base_stats[tuple(base_prompts)] = capture(pipe, base_prompts, layers, config, faithful_cosine,
                                                          desc=f"base prompts ({concept.kind})", progress=progress)[0]
            stats, record["timesteps"] = capture(pipe, concept_prompts, layers, config, faithful_cosine,
                                                 desc=concept.name, progress=progress)
            scored = time.perf_counter()
            with cpu_threads(denoiser.device, config.statistics_threads):
                masks = concept_mask(layers, stats, base_stats[tuple(base_prompts)], concept)
                votes.add(masks)
            timings["capture_s"] += scored - started
            timings["scoring_s"] += time.perf_counter() - scored
            record["prompts"][concept.name] = [list(pair) for pair in pairs]
            record["concept_masks"][concept.name] = {name: int(m.sum()) for name, m in masks.items()}
    if state.num_processes > 1:
        record = merged_records(record, concepts)
        votes.sum_across_processes()
        record["processes"] = state.num_processes  # timings are the main process's own share
    fused = time.perf_counter()
    with cpu_threads(denoiser.device, config.statistics_threads):
        prune, keep = votes.fuse(alpha)
        weights = {f"{name}.weight": layer.weight for name, layer in layers.items()}
        fill = noise_fill(weights, {f"{n}.weight": m for n, m in prune.items()}, config.seed) \
            if config.fill == "noise" else None  # drawn from the scored columns' rows only
        masks = {f"{name}.weight": layers[name].full_mask(mask) for name, mask in prune.items()}
    timings["scoring_s"] += time.perf_counter() - fused  # fusion and the fill's draws count as scoring too
    record["fusion"] = {"concepts": votes.concepts, "tau": votes.threshold(alpha),
                        "kept_agnostic": {name: int(k.sum()) for name, k in keep.items()}}
    record["timings"] = timings
    return MaskEdit(masks, fill), record


def noise_fill(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """New values of the masked entries: for each entry, a draw from N(mean, std) of its row's unmasked weights.

    Drawn on the CPU (the same values on every device), in the masks' name order; only the masked entries are drawn.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    values = {}
    for name, mask in sorted(masks.items()):
        weight = weights[name].detach()
        values[name] = row_draws(weight.float().flatten(1), mask.flatten(1), generator).to(weight.dtype)
    return values


def merged_records(record: dict, concepts: list[Concept]) -> dict:
    """Every process's per-concept record, in the concepts' order (as one process writes it)."""
    from accelerate.utils import gather_object

    parts = gather_object([record])
    merged = {key: {} for key in ("prompts", "concept_masks")}
    for concept in concepts:
        for key in merged:
            merged[key][concept.name] = next(p[key][concept.name] for p in parts if concept.name in p[key])
    return {**merged, "timesteps": next(p["timesteps"] for p in parts if p["timesteps"])}
