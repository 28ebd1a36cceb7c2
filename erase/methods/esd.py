"""ESD (erasing concepts from diffusion models), a training baseline (docs/methods.md).

Train θ so that ε_θ(x_t, c) → ε*(x_t, c) − η (ε*(x_t, c) − ε*(x_t, ∅)), ε* the frozen model: the concept's
prediction becomes the frozen model's negatively guided one. x_t comes from the frozen model's own sampling
(guidance 3) stopped after a random number of steps. ESD-x trains the cross-attention (styles), ESD-u every
other Linear/Conv weight (global concepts). The frozen model is the same UNet with its original weights swapped
back in for the teacher passes, so only one UNet is in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..capture import CaptureSettings, conditioning, denoise_first_calls
from ..config import check_choice, check_positive_int
from ..training import Trainer, TrainingSettings, attn2_parameters
from . import register

TRAIN_SETS = ("esd-x", "esd-u")


@dataclass
class ESDConfig(TrainingSettings):
    """ESD settings (the paper's defaults; fewer steps make a quick, weaker erasure)."""

    train: str = "esd-x"
    """esd-x: the cross-attention (attn2) parameters; esd-u: every other Linear/Conv weight and bias."""
    steps: int = 1000
    """Optimiser steps, batch 1, cycling through the concepts."""
    lr: float = 1e-5
    negative_guidance: float = 1.0
    """η: how far past the unconditional prediction the concept is pushed."""
    start_guidance: float = 3.0
    """CFG of the frozen model's sampling that produces x_t."""
    sample_steps: int = 50
    """Steps of that sampling; x_t is taken after a uniformly random number of them."""

    def validate(self) -> None:
        super().validate()
        check_choice("train", self.train, TRAIN_SETS)
        check_positive_int("sample_steps", self.sample_steps)


def trainable(unet: nn.Module, train: str) -> dict[str, nn.Parameter]:
    """The parameters a train set updates."""
    if train == "esd-x":
        return attn2_parameters(unet)
    layers = (n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and ".attn2." not in n)
    names = {f"{n}.{kind}" for n in layers for kind in ("weight", "bias")}
    return {n: p for n, p in unet.named_parameters() if n in names}


@register("esd", ESDConfig, "fine-tune towards the frozen model's negatively guided prediction (ESD-x / ESD-u)")
def run(pipe, concepts, catalog, config: ESDConfig, progress: bool = True,
        unet_fingerprint: str | None = None):
    trainer = Trainer(pipe, trainable(pipe.unet, config.train), config, "esd", concepts, progress,
                      unet_fingerprint)
    with torch.no_grad():  # encoded once, not at every step
        prompts = {c.name: conditioning(pipe, [c.text], trainer.side) for c in concepts}
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
                frozen = denoise_first_calls(pipe, [concept.text], sampling, kwargs=prompts[concept.name])
            target = frozen.cond - config.negative_guidance * (frozen.cond - frozen.uncond)
            t = torch.tensor(frozen.timesteps[-1], device=pipe.unet.device)
            prediction = trainer.predict(frozen.model_input, t, frozen.kwargs).chunk(2)[1]
            loss = torch.nn.functional.mse_loss(prediction, target.float())
            optimizer.zero_grad(set_to_none=True)
            trainer.backward(loss)
            optimizer.step()
            return {"loss": loss}

        trainer.loop(config.steps, step, state=lambda: {"optimizer": optimizer.state_dict()},
                     restore=lambda s: optimizer.load_state_dict(s["optimizer"]), desc="esd")
        edit = trainer.edit()
    return edit, trainer.finish()
