"""ESD (erasing concepts from diffusion models), a training baseline (docs/methods.md).

Train θ so that ε_θ(x_t, c) → ε*(x_t, c) − η (ε*(x_t, c) − ε*(x_t, ∅)), ε* the frozen model: the concept's
prediction becomes the frozen model's negatively guided one (for a flow-matching model, its velocity). x_t comes from
the frozen model's own sampling (guidance 3) stopped after a random number of steps; a model sampled without CFG
(Flux.1) gets ε*(x_t, ∅) from a second pass with the empty prompt. ESD-x trains the attention where the text meets
the image (a UNet's cross-attention, a DiT's joint attention; styles), ESD-u every other Linear/Conv weight (global
concepts). The frozen model is the same denoiser with its original weights swapped back in for the teacher passes,
so only one denoiser is in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..capture import CaptureSettings, first_calls
from ..config import check_choice, check_positive_int
from ..families import FAMILIES, Family, family_of
from ..training import Trainer, TrainingSettings, encode
from . import register

TRAIN_SETS = {"esd-x": "attention", "esd-u": "rest"}
"""ESD's train sets, as the model family names them (Family.trainable)."""


@dataclass
class ESDConfig(TrainingSettings):
    """ESD settings (the paper's defaults; fewer steps make a quick, weaker erasure)."""

    train: str = "esd-x"
    """esd-x: the attention where the text meets the image (a UNet's attn2, a DiT's joint attention); esd-u: every
    other Linear/Conv weight and bias."""
    steps: int = 1000
    """Optimiser steps, batch 1, cycling through the concepts."""
    lr: float = 1e-5
    negative_guidance: float = 1.0
    """η: how far past the unconditional prediction the concept is pushed."""
    start_guidance: float = 3.0
    """Guidance of the frozen model's sampling that produces x_t (CFG; Flux.1 dev: its guidance embedding)."""
    sample_steps: int = 50
    """Steps of that sampling; x_t is taken after a uniformly random number of them."""

    def validate(self) -> None:
        super().validate()
        check_choice("train", self.train, tuple(TRAIN_SETS))
        check_positive_int("sample_steps", self.sample_steps)


def trainable(denoiser: nn.Module, train: str, family: Family = FAMILIES["unet"]) -> dict[str, nn.Parameter]:
    """The parameters a train set updates in a denoiser of `family` (default: a Stable Diffusion UNet)."""
    return family.trainable(denoiser, TRAIN_SETS[train])


@register("esd", ESDConfig, "fine-tune towards the frozen model's negatively guided prediction (ESD-x / ESD-u)")
def run(pipe, concepts, catalog, config: ESDConfig, progress: bool = True,
        denoiser_fingerprint: str | None = None):
    family = family_of(pipe)
    trainer = Trainer(pipe, trainable(family.denoiser(pipe), config.train, family), config, "esd", concepts, progress,
                      denoiser_fingerprint)
    empty = encode(pipe, [""], trainer.side)  # ε*(x_t, ∅) of a model sampled without CFG; encoded once

    def unconditional(frozen, t: torch.Tensor) -> torch.Tensor:
        """ε*(x_t, ∅): the CFG batch's unconditional half, or a pass with the empty prompt at the same call."""
        if frozen.uncond is not None:
            return frozen.uncond
        with torch.no_grad():
            return trainer.forward(frozen.model_input, t, {**frozen.kwargs, **empty})

    with trainer.training():
        optimizer = torch.optim.Adam(trainer.params.values(), lr=config.lr)

        def step(i: int) -> dict:
            concept = concepts[i % len(concepts)]
            gen = trainer.generator(i)
            calls = int(torch.randint(config.sample_steps, (1,), generator=gen)) + 1
            sampling = CaptureSettings(steps=config.sample_steps, saliency_steps=calls, batch_size=1,
                                       guidance_scale=config.start_guidance, resolution=config.resolution,
                                       seed=int(torch.randint(2**31, (1,), generator=gen)))
            with trainer.weights(trainer.original):  # the frozen model samples x_t and predicts there
                frozen = first_calls(pipe, [concept.text], sampling)
                t = torch.tensor(frozen.timesteps[-1], device=trainer.denoiser.device)
                uncond = unconditional(frozen, t)
            target = frozen.cond - config.negative_guidance * (frozen.cond - uncond)
            prediction = trainer.forward(frozen.model_input, t, frozen.kwargs)[-len(frozen.cond):]  # conditional rows
            loss = torch.nn.functional.mse_loss(prediction, target.float())
            optimizer.zero_grad(set_to_none=True)
            trainer.backward(loss)
            optimizer.step()
            return {"loss": loss}

        trainer.loop(config.steps, step, state=lambda: {"optimizer": optimizer.state_dict()},
                     restore=lambda s: optimizer.load_state_dict(s["optimizer"]), desc="esd")
        edit = trainer.edit()
    record = trainer.finish()
    if "training_guidance" in record:  # a guidance-distilled model's passes are the sampling's: at its guidance
        record["training_guidance"] = config.start_guidance
    return edit, record
