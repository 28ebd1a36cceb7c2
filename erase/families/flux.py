"""Flux.1 dev and schnell: double-stream blocks (separate image and text feed-forwards) then single-stream blocks
(attention and MLP in parallel, joined by one output projection), flow matching; dev is guidance-distilled (a
guidance embedding, no CFG), schnell takes no guidance. CLIP-L gives the pooled vector, T5 the sequence."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Family, Target, find_target_layers, register_family


@register_family
class FluxFamily(Family):
    name = "flux"
    title = "Flux.1 dev / schnell"
    ffn_pattern = "transformer_blocks.*.ff*.net.2"
    text_pattern = "context_embedder"
    """The T5 sequence enters only through it (UCE's own Flux script edits it too)."""
    attention = r"^transformer_blocks\.\d+\.attn\."
    flow_matching = True
    single_file = "BFL transformer file (ComfyUI's diffusion-model loader, Forge)"
    layout = "erase.families.flux_file"
    single_file_holds = "denoiser"

    def matches(self, pipe) -> bool:
        from diffusers import FluxTransformer2DModel

        return isinstance(getattr(pipe, "transformer", None), FluxTransformer2DModel)

    def ffn_targets(self, denoiser: nn.Module) -> dict[str, Target]:
        """Double blocks: `ff.net.2` and `ff_context.net.2`. Single blocks: the MLP's part of `proj_out`, whose input
        is [attention output (inner dim) | MLP hidden units]: only the columns of the hidden units are neurons."""
        targets = find_target_layers(denoiser, self.ffn_pattern)
        inner = denoiser.config.num_attention_heads * denoiser.config.attention_head_dim
        for index, block in enumerate(denoiser.single_transformer_blocks):
            targets[f"single_transformer_blocks.{index}.proj_out"] = Target(block.proj_out, slice(inner, None))
        return targets

    def text_tokenizer(self, pipe):
        return pipe.tokenizer_2

    def text_embeddings(self, pipe, texts: list[str]) -> torch.Tensor:
        return pipe.encode_prompt(prompt=texts, prompt_2=None, device=pipe.transformer.device,
                                  num_images_per_prompt=1)[0]

    def guidance(self, pipe) -> str:
        return "distilled" if pipe.transformer.config.guidance_embeds else "none"

    def guidance_scale(self, pipe) -> float:
        return 3.5 if pipe.transformer.config.guidance_embeds else 0.0

    def default_side(self, pipe) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    def side_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # latents are packed in 2x2 patches

    def activation_bytes(self, denoiser: nn.Module, latent_side: int) -> int:
        config = denoiser.config
        return (latent_side // 2) ** 2 * config.num_attention_heads * config.attention_head_dim * denoiser.dtype.itemsize

    # -- training ----------------------------------------------------------------------------------------------
    def conditioning(self, pipe, prompts: list[str], side: int) -> dict:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe.transformer.device,
                                               num_images_per_prompt=1)
        dtype = pipe.transformer.dtype
        return {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype)}

    def predict(self, pipe, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """As the pipeline calls it: σ (its timestep / 1000), the positions of the image tokens (a square grid of
        packed latents) and of the text tokens (zeros), and dev's guidance embedding at the family's guidance."""
        n, tokens = x_t.shape[:2]
        grid = math.isqrt(tokens)
        shared = {"img_ids": pipe._prepare_latent_image_ids(n, grid, grid, x_t.device, x_t.dtype),
                  "txt_ids": x_t.new_zeros(conditioning["encoder_hidden_states"].shape[1], 3),
                  "guidance": torch.full((n,), self.guidance_scale(pipe), device=x_t.device)
                  if self.guidance(pipe) == "distilled" else None}
        return self.forward(model, x_t, t / 1000, {**conditioning, **shared})

    def latents_shape(self, pipe, side: int) -> list[int]:
        """Packed: [2×2 patches of the latent image, 4 × the VAE's channels]."""
        patches = side // self.side_multiple(pipe)
        return [patches**2, self.denoiser(pipe).config.in_channels]
