"""Edits: what a method changes in a UNet, applied in place and restored bit-exactly.

Evaluation compares the original and the erased model with one UNet in memory: apply, generate, restore.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch
from torch import nn

from .errors import EraseError
from .masks import pack_bits, unpack_bits

PATCH_FORMAT = "erase.mask/1"


def fingerprint(module: nn.Module) -> str:
    """sha256 over every tensor of the module's state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).flatten().cpu().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


class MaskEdit:
    """Zero the weights where a boolean prune mask is True (W ← W ⊙ (1 − prune)); biases are untouched.

    masks: parameter name in the UNet (e.g. 'mid_block....ff.net.2.weight') → bool tensor of the weight's shape.
    """

    format = PATCH_FORMAT

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        self._saved: dict[str, torch.Tensor] | None = None

    @property
    def applied(self) -> bool:
        return self._saved is not None

    def _parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(unet.named_parameters())
        missing = [name for name in self.masks if name not in params]
        if missing:
            raise EraseError(f"the UNet has no parameter {missing[0]!r}: this edit was made for another architecture")
        for name, mask in self.masks.items():
            if params[name].shape != mask.shape:
                raise EraseError(f"{name} has shape {list(params[name].shape)}, the edit expects {list(mask.shape)}: "
                                 "this edit was made for another architecture")
        return {name: params[name] for name in self.masks}

    @torch.no_grad()
    def apply(self, unet: nn.Module) -> None:
        if self.applied:
            raise EraseError("this edit is already applied: restore it before applying it again")
        saved = {}
        for name, param in self._parameters(unet).items():
            mask = self.masks[name].to(param.device)
            saved[name] = param[mask].clone()
            param[mask] = 0
        self._saved = saved

    @torch.no_grad()
    def restore(self, unet: nn.Module) -> None:
        if not self.applied:
            raise EraseError("this edit is not applied: nothing to restore")
        for name, param in self._parameters(unet).items():
            param[self.masks[name].to(param.device)] = self._saved[name].to(param.device)
        self._saved = None

    @contextmanager
    def applied_to(self, unet: nn.Module):
        """Apply for the duration of a with-block, restoring even if the block raises."""
        self.apply(unet)
        try:
            yield unet
        finally:
            self.restore(unet)

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: {"numel": mask.numel(), "pruned": int(mask.sum())} for name, mask in self.masks.items()}

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        """Packed masks (1 bit a weight) and their shapes, for the patch file."""
        packed = {name: pack_bits(mask).cpu() for name, mask in self.masks.items()}
        return packed, {name: list(mask.shape) for name, mask in self.masks.items()}

    @classmethod
    def from_tensors(cls, packed: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> "MaskEdit":
        if set(packed) != set(shapes):
            raise EraseError("the patch's masks and shapes disagree: the patch is corrupt, export it again")
        return cls({name: unpack_bits(packed[name], tuple(shapes[name])) for name in packed})
