"""Dynamic gradient masks with the concept-aware loss, one concept after another (docs/methods.md, "Sculpting
Memory").

Per concept: a warm-up accumulates the dense gradient G of the denoising loss on the concept's images (no
update), then per layer the top `density` of |G| is trainable. Training minimises
    L = MSE(ε_θ(x^f_t, c_f), sg[ε_θ(x^f_t, c_s)]) + λ_align · MSE(ε_θ(x^s_t, c_s), ε) + λ_kd · L_kd,
c_s the concept's superclass (its anchor; its images are sampled with the concept as negative prompt). Every
`update_every` steps of the first `update_until` of training, the fraction f = turnover · ½(1 + cos(π · progress))
of active weights with the least accumulated |G| is dropped and as many inactive ones with the most regrown.
L_kd = MSE(ε_θ(x, c), ε_teacher(x, c)) with the teacher the model at the start of this concept, on superclass
images and on the earlier concepts' images and prompts: it keeps them forgotten (the reference code computes
it and then overwrites it; here it acts, and a test shows it). The trained weights are the attention where the text
meets the image (a UNet's cross-attention, a DiT's joint attention); for a flow-matching model (SD3, Flux.1) ε is its
velocity target ε − x0 and ε_θ its output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_ratio
from ..families import family_of
from ..masks import count, drop_and_regrow, layer_topk_mask
from ..training import DataSettings, MaskedOptimizer, Trainer
from . import register


@dataclass
class DynamicMaskConfig(DataSettings):
    """Dynamic-mask settings; defaults as the published runs (10 epochs of 50 batches of 2, lr 3e-6)."""

    steps: int = 450
    """Optimiser steps per concept, after its warm-up."""
    lr: float = 3e-6
    batch_size: int = 2
    warmup: int = 50
    """Steps per concept that only accumulate the gradient which initialises the mask."""
    density: float = 0.5
    """Fraction of each layer's weights that is trainable."""
    update_every: int = 100
    turnover: float = 0.2
    """f0: fraction of active weights exchanged at the first mask update (decays with a cosine)."""
    update_until: float = 0.8
    """Masks are updated during this fraction of the training steps."""
    align_weight: float = 0.25
    kd_weight: float = 0.25
    """Distillation towards the model at the start of each concept (0 turns it off)."""

    def validate(self) -> None:
        super().validate()
        for name in ("density", "turnover", "update_until"):
            check_ratio(name, getattr(self, name))


class ConceptStage:
    """What one concept's training keeps between steps: optimiser, schedule, masks, accumulated gradient, teacher."""

    def __init__(self, trainer: Trainer, config: DynamicMaskConfig) -> None:
        self.trainer, self.config = trainer, config
        params = list(trainer.params.values())
        self.optimizer = MaskedOptimizer(torch.optim.Adam(params, lr=config.lr), {})
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(self.optimizer.optimizer, max_lr=config.lr,
                                                            total_steps=config.steps, anneal_strategy="cos")
        self.masks: dict[str, torch.Tensor] = {}
        self.gradient = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in trainer.params.items()}
        self.teacher = {n: p.detach().clone() for n, p in trainer.params.items()}

    def accumulate(self) -> None:
        """G += the dense gradient of this step (the optimiser later sees only its masked part)."""
        for n, p in self.trainer.params.items():
            if p.grad is not None:
                self.gradient[n] += p.grad.float()

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        self.optimizer.set_masks({self.trainer.params[n]: m for n, m in masks.items()})
        for g in self.gradient.values():
            g.zero_()

    def initial_masks(self) -> None:
        self.set_masks({n: layer_topk_mask(g.abs(), count(self.config.density, g.numel()))
                        for n, g in self.gradient.items()})

    def update_masks(self, progress: float) -> None:
        fraction = self.config.turnover * 0.5 * (1 + math.cos(math.pi * progress))
        self.set_masks({n: drop_and_regrow(m, self.gradient[n].abs(), fraction) for n, m in self.masks.items()})

    def state(self) -> dict:
        return {"optimizer": self.optimizer.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "masks": {n: m.cpu() for n, m in self.masks.items()},
                "gradient": {n: g.cpu() for n, g in self.gradient.items()},
                "teacher": {n: t.cpu() for n, t in self.teacher.items()}}

    def restore(self, state: dict) -> None:
        device = next(iter(self.trainer.params.values())).device
        self.teacher = {n: t.to(device) for n, t in state["teacher"].items()}
        if state["masks"]:
            self.set_masks({n: m.to(device) for n, m in state["masks"].items()})
        self.gradient = {n: g.to(device) for n, g in state["gradient"].items()}  # after set_masks, which clears it
        self.optimizer.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])


def teacher_predictions(trainer: Trainer, teacher: dict, batches: list[tuple]) -> list[torch.Tensor]:
    """ε_teacher for each (x_t, t, cond): the teacher's weights are swapped in, not copied into a second denoiser.
    Call it before the step's student passes: swapping edits the weights those passes' graphs hold."""
    with torch.no_grad(), trainer.weights(teacher):
        return [trainer.predict(x_t, t, cond) for x_t, t, cond in batches]


@register("dynamic", DynamicMaskConfig, "sequential fine-tuning of text-image attention under dynamic gradient masks, "
                                        "concept-aware loss and distillation")
def run(pipe, concepts, catalog, config: DynamicMaskConfig, progress: bool = True,
        denoiser_fingerprint: str | None = None):
    family = family_of(pipe)
    trainer = Trainer(pipe, family.trainable(family.denoiser(pipe), "attention"), config, "dynamic", concepts,
                      progress, denoiser_fingerprint)
    data = [trainer.forget_set([c], catalog, negative_anchors=True) for c in concepts]
    per_concept = config.warmup + config.steps
    updates = {config.warmup + u for u in range(config.update_every, int(config.update_until * config.steps) + 1,
                                                  config.update_every)}
    stage: list[ConceptStage] = []

    def step(i: int) -> dict:
        k, j = divmod(i, per_concept)
        if j == 0:  # a new concept: fresh optimiser and schedule, the current model as teacher
            stage[:] = [ConceptStage(trainer, config)]
        current, gen = stage[0], trainer.generator(i)
        latents, index = data[k].forget.batch(config.batch_size, gen)
        x_t, t, target = trainer.noised(latents, gen)
        if j < config.warmup:  # the plain denoising loss, only to rank the weights by gradient
            loss = F.mse_loss(trainer.predict(x_t, t, data[k].forget.cond(index)), target.float())
            trainer.backward(loss)
            current.accumulate()
            current.optimizer.zero_grad()
            if j + 1 == config.warmup:
                current.initial_masks()
            return {"loss": loss, "concept": k}
        s_latents, s_index = data[k].anchors.batch(config.batch_size, gen)
        s_x, s_t, s_target = trainer.noised(s_latents, gen)
        s_cond = data[k].anchors.cond(s_index)
        kd_batches = [(s_x, s_t, s_cond)] if config.kd_weight > 0 else []
        for earlier in data[:k] if kd_batches else []:  # keep the concepts erased before this one erased
            e_latents, e_index = earlier.forget.batch(config.batch_size, gen)
            e_x, e_t, _ = trainer.noised(e_latents, gen)
            kd_batches.append((e_x, e_t, earlier.forget.cond(e_index)))
        kd_targets = teacher_predictions(trainer, current.teacher, kd_batches) if kd_batches else []
        with torch.no_grad():
            superclass = trainer.predict(x_t, t, data[k].anchor_cond(index))
        losses = {"forget": F.mse_loss(trainer.predict(x_t, t, data[k].forget.cond(index)), superclass),
                  "align": F.mse_loss(trainer.predict(s_x, s_t, s_cond), s_target.float())}
        loss = losses["forget"] + config.align_weight * losses["align"]
        if kd_targets:
            losses["kd"] = sum(F.mse_loss(trainer.predict(x, ts, cond), target)
                               for (x, ts, cond), target in zip(kd_batches, kd_targets)) / len(kd_targets)
            loss = loss + config.kd_weight * losses["kd"]
        trainer.backward(loss)
        current.accumulate()
        current.optimizer.step()
        current.optimizer.zero_grad()
        current.schedule.step()
        if j + 1 in updates:
            current.update_masks((j + 1 - config.warmup) / config.steps)
        return {"loss": loss, "concept": k, **losses}

    with trainer.training():
        def restore(state: dict) -> None:
            stage[:] = [ConceptStage(trainer, config)]
            stage[0].restore(state)

        trainer.loop(len(concepts) * per_concept, step, state=lambda: stage[0].state(), restore=restore,
                     desc="dynamic masks")
        edit = trainer.edit()
    record = {**trainer.finish(),
              "superclass": {c.name: c.anchor or "(the base prompts)" for c in concepts},
              "steps_per_concept": {"warmup": config.warmup, "train": config.steps},
              "mask_updates_at": sorted(updates)}
    return edit, record
