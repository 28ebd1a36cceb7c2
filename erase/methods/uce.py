"""UCE (unified concept editing): a closed-form edit of the layers that read the text embeddings (docs/methods.md):
a UNet's cross-attention keys and values; SD3's and Flux's context embedder, the one Linear through which the text
sequence enters every block.

For every target projection W:
    W ← (λ W + Σ_erase (W g_i) c_iᵀ + Σ_keep (W c_j) c_jᵀ) (λ I + Σ_erase c_i c_iᵀ + Σ_keep c_j c_jᵀ)⁻¹
so that a concept's token embedding c_i now yields what its guide g_i (the anchor) yielded, while preserved
embeddings c_j keep their outputs. c is the text encoder's output at the text's last word token.

It is solved for the change (the left factor minus W times the right one):
    ΔW = Σ_erase (W (g_i − c_i)) c_iᵀ (λ I + Σ_erase c_i c_iᵀ + Σ_keep c_j c_jᵀ)⁻¹
whose rounding scales with the change, not with W: a guide equal to its concept changes nothing, and a weight whose
change is below its dtype's rounding stays bit-exact and is not counted as edited (solving for W itself moves every
weight by the solver's rounding noise).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import check_positive
from ..edits import MaskEdit
from ..errors import EraseError
from ..families import family_of
from . import register


@dataclass
class UCEConfig:
    """UCE settings (defaults of the paper's erasure runs)."""

    target: str = "text"
    """The layers edited: 'text', the model family's Linear layers that read the text embeddings (a UNet's
    `*attn2.to_[kv]`, SD3's and Flux's `context_embedder`), or a glob over the denoiser's module names."""
    lam: float = 0.5
    """λ: how strongly every other direction keeps its old output."""
    preserve: list[str] = field(default_factory=list)
    """Texts whose outputs must not change (e.g. other artists when erasing one)."""
    seed: int = 0
    """Unused by the closed form; recorded for uniformity with the other methods."""

    def validate(self) -> None:
        check_positive("lam", self.lam, "0.5")
        if not isinstance(self.preserve, list) or not all(isinstance(t, str) for t in self.preserve):
            raise EraseError("preserve must be a list of texts, e.g. --set 'preserve=[claude monet, a dog]'")


def check_guides(concepts, config: UCEConfig) -> None:
    """Refuse a concept guided to itself (the tokenizer reads case and spacing alike): its edit is W ← W."""
    for concept in concepts:
        if concept.anchor.casefold().split() == concept.text.casefold().split():
            raise EraseError(f"concept {concept.name!r} has itself as anchor, so UCE would change nothing: name "
                             f"another anchor, e.g. --concepts \"{concept.name}=>OTHER TEXT\"")


@torch.no_grad()
def last_token_embeddings(pipe, texts: list[str]) -> torch.Tensor:
    """[len(texts), d]: the text embeddings the edited layers read, at each text's last word token (its end token for
    ""). The tokenizer is the one of that sequence (Flux: T5's): its token list ends in one end token, after a start
    token where it has one (CLIP; T5 has none), so the last word sits just before the end token."""
    family = family_of(pipe)
    embeds = family.text_embeddings(pipe, texts)
    tokenizer = family.text_tokenizer(pipe)
    ids = [tokenizer(t).input_ids for t in texts]
    starts = [int(tokenizer.bos_token_id is not None and i[0] == tokenizer.bos_token_id) for i in ids]
    index = torch.tensor([len(i) - 2 if len(i) > 1 + s else len(i) - 1 for i, s in zip(ids, starts)],
                         device=embeds.device)
    return embeds[torch.arange(len(texts)), index].float()


@register("uce", UCEConfig, "closed-form edit of cross-attention keys and values towards each concept's anchor",
          check=check_guides)
def run(pipe, concepts, catalog, config: UCEConfig, progress: bool = True,
        denoiser_fingerprint: str | None = None):
    started = time.perf_counter()
    family = family_of(pipe)
    layers = family.text_projections(family.denoiser(pipe), config.target)
    erase_c = last_token_embeddings(pipe, [c.text for c in concepts])
    guide = last_token_embeddings(pipe, [c.anchor for c in concepts])
    keep = last_token_embeddings(pipe, config.preserve) if config.preserve else erase_c[:0]
    old, new = {}, {}
    for name, layer in layers.items():
        w = layer.weight.detach().float()
        eye = torch.eye(w.shape[1], device=w.device)
        pull = (w @ (guide - erase_c).T) @ erase_c
        rhs = config.lam * eye + erase_c.T @ erase_c + keep.T @ keep
        old[f"{name}.weight"] = layer.weight.detach()
        new[f"{name}.weight"] = (w + torch.linalg.solve(rhs, pull.T).T).to(layer.weight.dtype)  # rhs is symmetric
    record = {"guides": {c.name: c.anchor for c in concepts}, "preserve": config.preserve,
              "timings": {"solve_s": round(time.perf_counter() - started, 3)}}
    return MaskEdit.from_weights(new, old), record
