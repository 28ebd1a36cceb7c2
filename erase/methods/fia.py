"""FIA (Forget-It-All): training-free concept-aware neuron masking (docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check_ratio
from ..errors import EraseError
from ..saliency import MaskingConfig, erase_with_masks, fia_concept_mask
from . import register


@dataclass
class FIAConfig(MaskingConfig):
    """FIA settings. Defaults follow the paper (objects r2 0.007, art 0.02 with α 0.8: see erase/configs/)."""

    r1: float = 0.05
    """Per-step activation threshold: the top r1 of S_t counts towards a weight's frequency term."""
    r2: float = 0.01
    """Sparsity of a concept mask: a weight must be in its row's top-r2 and the layer's top-r2 of A."""
    alpha: float = 0.6
    """Concept-agnostic ratio: weights in at least ceil(alpha · C) of C concept masks are kept (C ≥ 2)."""
    faithful_cosine: bool = False
    """Multiply by |cos(X_j, Y_i)| as in the paper's Eq. 1 (off in the reference runs). Costs memory of
    3 · saliency_steps · numel floats per layer instead of columns only."""
    overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per-concept r1/r2, e.g. {'van gogh': {'r2': 0.03}, 'sexual': {'r1': 0.06}}."""

    def validate(self) -> None:
        super().validate()
        for name in ("r1", "r2", "alpha"):
            check_ratio(name, getattr(self, name))
        if not isinstance(self.overrides, dict):
            raise EraseError("overrides must map a concept name to {r1: ..., r2: ...}")
        for concept, values in self.overrides.items():
            if not isinstance(values, dict) or set(values) - {"r1", "r2"}:
                raise EraseError(f"overrides for {concept!r} may set only r1 and r2, e.g. --set overrides.{concept}.r2=0.03")
            for name, value in values.items():
                check_ratio(f"overrides.{concept}.{name}", value)

    def ratios(self, concept: str) -> tuple[float, float]:
        values = {k.lower(): v for k, v in self.overrides.items()}.get(concept.lower(), {})
        return values.get("r1", self.r1), values.get("r2", self.r2)


@register("fia", FIAConfig, "training-free concept-aware neuron masking with concept-agnostic retention",
          masking=True)
def run(pipe, concepts, catalog, config: FIAConfig, progress: bool = True,
        denoiser_fingerprint: str | None = None):
    def concept_mask(layers, concept_stats, base_stats, concept):
        r1, r2 = config.ratios(concept.name)
        return fia_concept_mask(layers, concept_stats, base_stats, r1, r2)

    return erase_with_masks(pipe, concepts, catalog, config, concept_mask, alpha=config.alpha,
                            faithful_cosine=config.faithful_cosine, progress=progress)
