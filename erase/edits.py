"""Edits: what a method changes in a UNet, applied in place and restored bit-exactly.

Evaluation compares the original and the erased model with one UNet in memory: apply, generate, restore.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import EraseError
from .masks import pack_bits, unpack_bits

PATCH_FORMAT = "erase.mask/1"  # specified in docs/PATCH_FORMAT.md: masks and optional `:values`; bump on any change
VALUES = ":values"


def fingerprint(module: nn.Module) -> str:
    """sha256 over every tensor of the module's state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).flatten().cpu().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


class MaskEdit:
    """Set the weights where a boolean mask is True: to zero (pruning, W ← W ⊙ (1 − mask)) or, for methods that
    train or solve for new weights, to the new values there (a delta that is sparse where the mask is sparse).

    masks: parameter name in the UNet (e.g. 'mid_block....ff.net.2.weight') → bool tensor of the weight's shape.
    values: the same names → the new values at the mask's True entries, in order (None: zeros).
    """

    def __init__(self, masks: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None = None) -> None:
        self.masks = masks
        self.values = values
        self._saved: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_weights(cls, new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> MaskEdit:
        """The edit that turns `old` weights into `new` ones: masks where they differ, values the new entries."""
        masks = {name: new[name] != old[name] for name in new}
        return cls(masks, {name: new[name][mask].detach().clone() for name, mask in masks.items()})

    @property
    def applied(self) -> bool:
        return self._saved is not None

    def check_fits(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters the edit changes, after refusing a UNet it does not fit: a name it lacks, a weight of
        another shape than the mask's, values of another dtype than the weight's, a mask that is not boolean."""
        params = dict(unet.named_parameters())
        for name, mask in self.masks.items():
            if name not in params:
                raise EraseError(f"the UNet has no parameter {name!r}: this edit was made for another architecture")
            if mask.dtype != torch.bool or params[name].shape != mask.shape:
                raise EraseError(f"{name} is {_described(params[name])}, the edit's mask is {_described(mask)}: this "
                                 "edit was made for another architecture (or its patch is corrupt: export it again)")
            if self.values is not None and self.values[name].dtype != params[name].dtype:
                raise EraseError(f"{name} is {_described(params[name])}, the edit's values are "
                                 f"{_described(self.values[name])}: apply it to the model it was made from, in its dtype")
        return {name: params[name] for name in self.masks}

    @torch.no_grad()
    def apply(self, unet: nn.Module) -> None:
        if self.applied:
            raise EraseError("this edit is already applied: restore it before applying it again")
        saved = {}
        for name, param in self.check_fits(unet).items():
            mask = self.masks[name].to(param.device)
            saved[name] = param[mask].clone()
            param[mask] = 0 if self.values is None else self.values[name].to(param.device, param.dtype)
        self._saved = saved

    @torch.no_grad()
    def restore(self, unet: nn.Module) -> None:
        if not self.applied:
            raise EraseError("this edit is not applied: nothing to restore")
        for name, param in self.check_fits(unet).items():
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

    def deltas(self, unet: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, what applying the edit adds to it: erased − original) per edited parameter, one at a time (a
        whole-UNet edit's deltas would be a second UNet in memory)."""
        if self.applied:
            raise EraseError("this edit is applied: restore it before taking its deltas")
        for name, param in self.check_fits(unet).items():
            with torch.no_grad():
                mask = self.masks[name].to(param.device)
                new = 0 if self.values is None else self.values[name].to(param.device, param.dtype)
                delta = torch.zeros_like(param)
                delta[mask] = new - param[mask]
            yield name, delta

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: {"numel": mask.numel(), "edited": int(mask.sum())} for name, mask in self.masks.items()}

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        """Packed masks (1 bit a weight, key NAME), new values (key NAME:values) and the shapes, for the patch."""
        tensors = {name: pack_bits(mask).cpu() for name, mask in self.masks.items()}
        for name, values in (self.values or {}).items():
            tensors[f"{name}{VALUES}"] = values.detach().contiguous().cpu()
        return tensors, {name: list(mask.shape) for name, mask in self.masks.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]],
                     where: str = "the patch") -> MaskEdit:
        """The edit a patch's tensors hold (`where`: the patch, for messages), refusing masks that are not the
        packed bits of their shapes and values that are not finite numbers, one for each of the mask's bits set."""
        values = {k.removesuffix(VALUES): v for k, v in tensors.items() if k.endswith(VALUES)}
        packed = {k: v for k, v in tensors.items() if not k.endswith(VALUES)}
        odd = set(packed) ^ set(shapes) or (set(values) ^ set(shapes) if values else set())
        if odd:
            raise EraseError(f"{where} is corrupt: its masks, values and shapes disagree on {min(odd)!r} (either "
                             "every mask has its values or none has): export it again")
        masks = {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            if packed[name].dtype != torch.uint8 or packed[name].shape != (math.ceil(numel / 8),):
                raise EraseError(f"{where} is corrupt: the mask of {name} is {_described(packed[name])}, not the "
                                 f"{math.ceil(numel / 8)} uint8 bytes of {numel} bits: export it again")
            masks[name] = unpack_bits(packed[name], tuple(shape))
        for name, new in values.items():
            edited = int(masks[name].sum())
            if not new.is_floating_point() or new.shape != (edited,):
                raise EraseError(f"{where} is corrupt: the values of {name} are {_described(new)}, not {edited} "
                                 "floating-point numbers, one per bit set in its mask: export it again")
            if not torch.isfinite(new).all():
                raise EraseError(f"{where} is corrupt: the values of {name} are not all finite "
                                 f"({int((~torch.isfinite(new)).sum())} NaN or infinite of {new.numel()}): export it "
                                 "again from a run whose weights are finite")
        return cls(masks, values or None)


def _described(tensor: torch.Tensor) -> str:
    """Its dtype and shape, as messages show them: `float16 [320, 1280]`."""
    return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
