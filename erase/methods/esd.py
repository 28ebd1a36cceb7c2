"""ESD (erasing concepts from diffusion models), a training baseline (METHODS.md §5).

Train θ so that ε_θ(x_t, c) → ε*(x_t, c) − η (ε*(x_t, c) − ε*(x_t, ∅)), ε* the frozen model: the concept's
prediction becomes the frozen model's negatively guided one. x_t comes from the frozen model's own sampling
(guidance 3) stopped after a random number of steps. ESD-x trains the cross-attention (styles), ESD-u every
other Linear/Conv weight (global concepts). The frozen model is the same UNet with its original weights swapped
back in for the teacher passes, so only one UNet is in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..capture import CaptureSettings, denoise_first_calls
from ..config import check_positive, check_positive_int
from ..edits import MaskEdit
from ..errors import EraseError
from ..training import swapped
from . import register

TRAIN_SETS = ("esd-x", "esd-u")


@dataclass
class ESDConfig:
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
    seed: int = 0

    def validate(self) -> None:
        if self.train not in TRAIN_SETS:
            raise EraseError(f"train={self.train!r} is unknown: use one of {', '.join(TRAIN_SETS)}")
        for name in ("steps", "sample_steps"):
            check_positive_int(name, getattr(self, name))
        check_positive("lr", self.lr, "1e-5")


def trainable(unet: nn.Module, train: str) -> dict[str, nn.Parameter]:
    """The parameters a train set updates."""
    if train == "esd-x":
        return {n: p for n, p in unet.named_parameters() if ".attn2." in n}
    layers = (n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and ".attn2." not in n)
    names = {f"{n}.{kind}" for n in layers for kind in ("weight", "bias")}
    return {n: p for n, p in unet.named_parameters() if n in names}


@register("esd", ESDConfig, "fine-tune towards the frozen model's negatively guided prediction (ESD-x / ESD-u)")
def run(pipe, concepts, catalog, config: ESDConfig, progress: bool = True):
    started = time.perf_counter()
    unet = pipe.unet
    params = trainable(unet, config.train)
    original = {n: p.detach().clone() for n, p in params.items()}
    requires_grad = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params.values(), lr=config.lr)
    draw = torch.Generator("cpu").manual_seed(config.seed)
    losses = []
    try:
        for step in tqdm(range(config.steps), desc="esd", unit="step", disable=not progress):
            concept = concepts[step % len(concepts)]
            calls = int(torch.randint(config.sample_steps, (1,), generator=draw)) + 1
            sampling = CaptureSettings(steps=config.sample_steps, saliency_steps=calls, batch_size=1,
                                       guidance_scale=config.start_guidance, seed=config.seed + step)
            with swapped(params, original):  # the frozen model samples x_t and predicts there
                frozen = denoise_first_calls(pipe, [concept.text], sampling)
            target = frozen.cond - config.negative_guidance * (frozen.cond - frozen.uncond)
            t = frozen.timesteps[-1]
            prediction = unet(frozen.model_input, t, **frozen.kwargs).sample.chunk(2)[1]
            loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(round(loss.item(), 6))
        trained = {n: p.detach().clone() for n, p in params.items()}
    finally:  # erase() leaves the pipeline as it was, even when interrupted; the edit carries the new weights
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n])
        for n, p in unet.named_parameters():
            p.requires_grad_(requires_grad[n])
    record = {"training_curve": losses, "trained_parameters": len(params),
              "timings": {"training_s": round(time.perf_counter() - started, 3)}}
    return MaskEdit.from_weights(trained, original), record
