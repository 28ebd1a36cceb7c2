"""Model families: one adapter per denoiser (a UNet or a diffusion transformer) that names what the methods, exports
and evaluation need from it. Matched in registration order: the generic transformer family comes last."""

from . import flux, sd3, transformer, unet  # noqa: F401  (registration, in matching order)
from .base import FAMILIES, Family, Target, denoiser_of, family_of, find_target_layers, linears, register_family

__all__ = ["FAMILIES", "Family", "Target", "denoiser_of", "family_of", "find_target_layers", "linears",
           "register_family"]
