"""Stable Diffusion 3 / 3.5: an MMDiT (SD3Transformer2DModel) with an image and a text stream, flow matching, CFG;
CLIP-L and CLIP-G text encoders and an optional T5 (users drop T5 to save memory)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Family, register_family


@register_family
class SD3Family(Family):
    name = "sd3"
    title = "Stable Diffusion 3 / 3.5 (MMDiT)"
    ffn_pattern = "transformer_blocks.*.ff*.net.2"
    """Both streams' feed-forwards: `ff` (image tokens) and `ff_context` (text tokens)."""
    text_pattern = "context_embedder"
    """The only Linear that reads the text encoders' sequence directly: every block sees the text through it."""
    attention = r"^transformer_blocks\.\d+\.attn\."
    flow_matching = True
    single_file = "SAI / ComfyUI SD3 checkpoint"
    layout = "erase.families.sd3_file"

    def matches(self, pipe) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel)

    def text_embeddings(self, pipe, texts: list[str]) -> torch.Tensor:
        return pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=pipe.transformer.device,
                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                  **self.call_kwargs(pipe))[0]

    def call_kwargs(self, pipe) -> dict:
        """The T5 sequence length the model's profile asks for (the miniature SD3 is trained with 1 zero token where
        SD3 without T5 puts 256), in every pipeline call and encode_prompt; none: the pipeline's default."""
        from ..profile import profile_of

        length = profile_of(pipe).max_sequence_length
        return {} if length is None else {"max_sequence_length": length}

    def default_side(self, pipe) -> int:
        return pipe.transformer.config.sample_size * pipe.vae_scale_factor

    def side_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def activation_bytes(self, denoiser: nn.Module, latent_side: int) -> int:
        config = denoiser.config
        tokens = (latent_side // config.patch_size) ** 2
        return tokens * config.num_attention_heads * config.attention_head_dim * denoiser.dtype.itemsize

    # -- training ----------------------------------------------------------------------------------------------
    def conditioning(self, pipe, prompts: list[str], side: int) -> dict:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                  device=pipe.transformer.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False, **self.call_kwargs(pipe))
        dtype = pipe.transformer.dtype
        return {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype)}
