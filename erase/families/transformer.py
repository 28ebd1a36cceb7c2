"""Any other diffusers text-to-image transformer whose feed-forwards are diffusers `FeedForward` modules (PixArt,
Chroma, ...): FIA and ConceptPrune find the feed-forwards by type; the diffusers folder and the patch are its exports.
UCE, the training methods and single files need a family of their own."""

from __future__ import annotations

import inspect

from torch import nn

from .base import Family, Target, register_family


def feedforward_outputs(denoiser: nn.Module) -> dict[str, nn.Linear]:
    """The output Linear of every diffusers FeedForward (its last Linear: `net.2`), by module name."""
    from diffusers.models.attention import FeedForward

    found = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, FeedForward):
            index, layer = [(i, m) for i, m in enumerate(module.net) if isinstance(m, nn.Linear)][-1]
            found[f"{name}.net.{index}"] = layer
    return found


@register_family
class TransformerFamily(Family):
    name = "transformer"
    title = "a diffusers text-to-image transformer (generic)"
    ffn_pattern = "(every diffusers FeedForward's output Linear)"
    trains = False

    def matches(self, pipe) -> bool:
        from diffusers import ModelMixin

        transformer = getattr(pipe, "transformer", None)
        return isinstance(transformer, ModelMixin) and getattr(pipe, "text_encoder", None) is not None and \
            bool(feedforward_outputs(transformer))

    def ffn_targets(self, denoiser: nn.Module) -> dict[str, Target]:
        return {name: Target(layer) for name, layer in feedforward_outputs(denoiser).items()}

    def default_side(self, pipe) -> int:
        latent = getattr(pipe, "default_sample_size", None) or pipe.transformer.config.sample_size
        return latent * pipe.vae_scale_factor

    def side_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * getattr(pipe.transformer.config, "patch_size", 1)

    def activation_bytes(self, denoiser: nn.Module, latent_side: int) -> int:
        config = denoiser.config
        width = getattr(config, "num_attention_heads", 1) * getattr(config, "attention_head_dim", 1)
        return (latent_side // getattr(config, "patch_size", 1)) ** 2 * width * denoiser.dtype.itemsize

    def call_kwargs(self, pipe) -> dict:
        """PixArt-style pipelines snap the side to their aspect-ratio bins unless told not to, and rewrite captions
        (a web-text cleaner) unless told not to: erase's prompts are drawn as written."""
        takes = inspect.signature(type(pipe).__call__).parameters
        return {name: False for name in ("use_resolution_binning", "clean_caption") if name in takes}
