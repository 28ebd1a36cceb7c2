"""Stable Diffusion 1.x, 2.x and XL: a UNet2DConditionModel with cross-attention to CLIP text embeddings."""

from __future__ import annotations

import torch
from torch import nn

from .base import Family, register_family


@register_family
class UNetFamily(Family):
    name = "unet"
    title = "Stable Diffusion 1.x / 2.x / XL (UNet)"
    attribute = "unet"
    own_loop = True
    ffn_pattern = "*ff.net.2"
    text_pattern = "*attn2.to_[kv]"
    single_file = "original Stable Diffusion checkpoint (A1111, ComfyUI, Forge)"
    layout = "erase.single_file"

    def matches(self, pipe) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(getattr(pipe, "unet", None), UNet2DConditionModel) and \
            getattr(pipe, "text_encoder", None) is not None

    def guidance_scale(self, pipe) -> float:
        return 7.5

    def default_side(self, pipe) -> int:
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    def activation_bytes(self, denoiser: nn.Module, latent_side: int) -> int:
        return denoiser.config.block_out_channels[0] * latent_side**2 * denoiser.dtype.itemsize

    # -- training ----------------------------------------------------------------------------------------------
    def conditioning(self, pipe, prompts: list[str], side: int) -> dict:
        """The conditional half of the CFG batch the pipeline builds (encoded with its unconditional half, as the
        sampling encodes it)."""
        from ..capture import conditioning
        from ..training import rows

        return rows(conditioning(pipe, prompts, side), torch.arange(len(prompts), 2 * len(prompts)))

    def forward(self, model: nn.Module, x: torch.Tensor, timestep, kwargs: dict) -> torch.Tensor:
        return model(x, timestep, **kwargs).sample
