"""ConceptPrune: the training-free predecessor of FIA, a baseline (docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_ratio
from ..saliency import MaskingConfig, conceptprune_concept_mask, erase_with_masks
from . import register


@dataclass
class ConceptPruneConfig(MaskingConfig):
    """ConceptPrune settings: the union over steps and concepts of 'skilled' weights is pruned."""

    skill_ratio: float = 0.01
    """A weight is skilled at a step when it is in its row's top skill_ratio · C_in by concept score."""

    def validate(self) -> None:
        super().validate()
        check_ratio("skill_ratio", self.skill_ratio)


@register("conceptprune", ConceptPruneConfig, "skilled-neuron pruning, union over steps and concepts",
          masking=True)
def run(pipe, concepts, catalog, config: ConceptPruneConfig, progress: bool = True,
        denoiser_fingerprint: str | None = None):
    def concept_mask(layers, concept_stats, base_stats, concept):
        return conceptprune_concept_mask(layers, concept_stats, base_stats, config.skill_ratio)

    return erase_with_masks(pipe, concepts, catalog, config, concept_mask, alpha=None, progress=progress)
