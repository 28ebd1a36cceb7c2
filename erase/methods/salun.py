"""SalUn: gradient weight saliency, then masked fine-tuning with a remap and a retain loss (docs/methods.md).

Saliency: g = |Σ ∇θ ℓ_f| over one pass of the forget images, ℓ_f = −MSE(ε, (1+w) ε_θ(x_t, c_f) − w ε_θ(x_t, ∅));
the mask is the top `saliency_fraction` of g in one global ranking over the trained parameters.
Unlearning: L = MSE(ε_θ(x_t, c_f), sg[ε_θ(x_t, c')]) + α · MSE(ε_θ(x^r_t, c'), ε^r), c' the concept's anchor (its
remap target; remap_target="original" takes ε_θ₀(x_t, c') of the unedited weights instead) and the retain images
those of the concept's rivals and anchor; only the masked weights move, strictly. For a flow-matching model (SD3,
Flux.1) ε is its velocity target ε − x0 and ε_θ its output.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_choice, check_ratio
from ..families import family_of
from ..masks import global_topk_masks
from ..training import DataSettings, Examples, MaskedOptimizer, Trainer, encode, rows
from . import register

TRAIN_SETS = {"unet": ("rest", "attention"), "attn2": ("attention",)}
"""SalUn's train sets (named after the UNet's; for a DiT the same parts), as the model family names them."""
REMAP_TARGETS = ("current", "original")


@dataclass
class SalUnConfig(DataSettings):
    """SalUn settings; the published runs: whole UNet, lr 1e-5, batch 8, 50% saliency, α 0.5 (classes)."""

    train: str = "unet"
    """unet: every Linear/Conv weight and bias of the denoiser (UNet or transformer); attn2: only the attention where
    the text meets the image (a UNet's cross-attention, a DiT's joint attention)."""
    saliency_fraction: float = 0.5
    saliency_guidance: float = 7.5
    """w of the CFG-combined prediction whose loss gradient ranks the weights."""
    retain_weight: float = 0.5
    """α: weight of the denoising loss on the retain images (the concept's rivals and anchor)."""
    remap_target: str = "current"
    """Whose prediction of the anchor the forget images are remapped to: current, the model being trained (under
    stop-gradient), as SalUn's code does; original, the unedited model's, a target that does not move with training
    (as ESD's frozen model)."""

    def validate(self) -> None:
        super().validate()
        check_choice("train", self.train, tuple(TRAIN_SETS))
        check_choice("remap_target", self.remap_target, REMAP_TARGETS)
        check_ratio("saliency_fraction", self.saliency_fraction)


def trained_parameters(pipe, train: str) -> dict:
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    return {name: p for part in TRAIN_SETS[train] for name, p in family.trainable(denoiser, part).items()}


def saliency_masks(trainer: Trainer, forget: Examples, config: SalUnConfig) -> dict[str, torch.Tensor]:
    """Top `saliency_fraction` of |Σ ∇ℓ_f| over one pass of the forget images, ranked globally."""
    unconditional = encode(trainer.pipe, [""], trainer.side)
    w = config.saliency_guidance
    for start in range(0, len(forget.latents), config.batch_size):
        index = torch.arange(start, min(start + config.batch_size, len(forget.latents)))
        x_t, t, target = trainer.noised(forget.latents[index], trainer.generator(start, stream=1))
        guided = ((1 + w) * trainer.predict(x_t, t, forget.cond(forget.prompt_index[index]))
                  - w * trainer.predict(x_t, t, rows(unconditional, torch.zeros(len(index), dtype=torch.long))))
        trainer.backward(-F.mse_loss(guided, target.float()))
    scores = {n: p.grad.abs() if p.grad is not None else torch.zeros_like(p) for n, p in trainer.params.items()}
    for p in trainer.params.values():
        p.grad = None
    return global_topk_masks(scores, config.saliency_fraction)


@register("salun", SalUnConfig, "gradient-saliency mask, then masked fine-tuning with remap and retain losses")
def run(pipe, concepts, catalog, config: SalUnConfig, progress: bool = True,
        denoiser_fingerprint: str | None = None):
    trainer = Trainer(pipe, trained_parameters(pipe, config.train), config, "salun", concepts, progress,
                      denoiser_fingerprint)
    data = trainer.forget_set(concepts, catalog)
    forget, retain = data.forget, trainer.retain_examples(concepts, catalog)
    # the unedited weights, taken before the loop restores a checkpoint's: the fixed remap target, if asked for
    original = {n: p.detach().clone() for n, p in trainer.params.items()} if config.remap_target == "original" else None
    with trainer.training():
        masks = saliency_masks(trainer, forget, config)
        optimizer = MaskedOptimizer(torch.optim.Adam(trainer.params.values(), lr=config.lr),
                                    {trainer.params[n]: m for n, m in masks.items()})

        def step(i: int) -> dict:
            gen = trainer.generator(i)
            latents, index = forget.batch(config.batch_size, gen)
            x_t, t, _ = trainer.noised(latents, gen)
            with torch.no_grad(), trainer.weights(original) if original else nullcontext():
                remapped = trainer.predict(x_t, t, data.anchor_cond(index))
            loss_forget = F.mse_loss(trainer.predict(x_t, t, forget.cond(index)), remapped)
            latents, index = retain.batch(config.batch_size, gen)
            x_t, t, target = trainer.noised(latents, gen)
            loss_retain = F.mse_loss(trainer.predict(x_t, t, retain.cond(index)), target.float())
            loss = loss_forget + config.retain_weight * loss_retain
            optimizer.zero_grad()
            trainer.backward(loss)
            optimizer.step()
            return {"loss": loss, "forget": loss_forget, "retain": loss_retain}

        trainer.loop(config.steps, step, state=lambda: {"optimizer": optimizer.optimizer.state_dict()},
                     restore=lambda s: optimizer.optimizer.load_state_dict(s["optimizer"]), desc="salun")
        edit = trainer.edit()
    record = {**trainer.finish(),
              "saliency_mask": {"fraction": config.saliency_fraction,
                                "trainable": sum(int(m.sum()) for m in masks.values()),
                                "of": sum(m.numel() for m in masks.values())},
              "remap": {c.name: c.anchor or "(the base prompts)" for c in concepts}}
    return edit, record
