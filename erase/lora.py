"""A training method's edit as a LoRA: kohya's format for UNets (A1111, ComfyUI and diffusers' `load_lora_weights`
read it), diffusers' own (PEFT) format for diffusion transformers (diffusers and ComfyUI read it).

Per edited Linear or Conv2d weight, the delta (erased − original; a conv's flattened to out × in·kh·kw, as kohya
does) is truncated by SVD to the rank asked: down = √S·Vh, up = U·√S at scale 1, one rank for every layer ('full':
the largest layer's whole rank). Biases and norm weights cannot be low-rank factors: they are left out, and their
share of the delta is reported with the SVD tail's. Masking methods (FIA, ConceptPrune) have no LoRA: a sparse mask
is not low-rank, so their edit stays a patch.

UNets: keys `lora_unet_<module, dots as underscores>.{lora_down.weight, lora_up.weight, alpha}` with alpha = rank,
named as kohya's sd-scripts names them: diffusers module names for SD1.x/SD2.x (kohya trains those on the diffusers
UNet, and diffusers' SD1 loader reads only those), the original (sgm) names for SDXL (kohya trains SDXL on its sgm
UNet; diffusers' SDXL loader maps add_embedding only from label_emb). ComfyUI (comfy/lora.py, model_lora_keys_unet)
maps both: the original names of its own state dict, and diffusers names through utils.unet_to_diffusers.

Transformers (Flux, SD3, ...): keys `transformer.<diffusers module>.{lora_A.weight, lora_B.weight}` (down, up), no
alpha: scale 1 in both loaders (diffusers' PEFT config takes alpha = rank, ComfyUI takes 1 when a module has none).
diffusers' pipelines load these names as they are; ComfyUI maps `transformer.<diffusers name>` onto its own layout
for Flux (utils.flux_to_diffusers: q, k, v and a single block's proj_mlp become row slices of the fused qkv and
linear1, norm_out's halves are swapped), SD3 (mmdit_to_diffusers), PixArt and AuraFlow. Kohya's Flux names
(`lora_unet_double_blocks_0_img_attn_qkv`) would hold one factorisation of the fused q, k, v delta where an edit
changes the three layers apart; the diffusers names carry each edited layer as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .edits import MaskEdit
from .errors import EraseError
from .export import encode_header
from .single_file import rename, unet_block_prefixes

FULL = "full"
PREFIX = "lora_unet_"
TRANSFORMER_PREFIX = "transformer."


@dataclass(frozen=True)
class Format:
    """How a LoRA file names a module's two factors."""

    name: str
    down: str
    up: str


KOHYA = Format("kohya", "lora_down.weight", "lora_up.weight")
DIFFUSERS = Format("diffusers", "lora_A.weight", "lora_B.weight")


def parse_rank(text) -> int | str:
    """A LoRA rank from the command line or the API: a positive whole number, or 'full' (every layer's whole rank)."""
    if text == FULL or (isinstance(text, int) and not isinstance(text, bool) and text > 0):
        return text
    if isinstance(text, str) and text.isdigit() and int(text) > 0:
        return int(text)
    raise EraseError(f"--lora {text!r} is not a rank: pass a positive whole number (e.g. --lora 8) or --lora full")


def check_lora_method(method, rank) -> None:
    """Refuse a LoRA of a masking method's edit, before any work."""
    if rank is not None and method.masking:
        raise EraseError(f"--lora exports a training method's weight delta, but {method.name} masks weights and a "
                         "sparse mask is not low-rank: drop --lora and share the patch or the single file, or use "
                         "--method esd, salun, uce or dynamic")


def kohya_names(unet: nn.Module, names: list[str]) -> dict[str, str]:
    """The kohya module key of each UNet weight name (see the module's docstring for the two spellings)."""
    if unet.config.addition_embed_type == "text_time":  # SDXL: the original layout's names
        original = rename({name: name for name in names}, unet_block_prefixes(unet.config))
        return {name: PREFIX + key.removesuffix(".weight").replace(".", "_") for key, name in original.items()}
    return {name: PREFIX + name.removesuffix(".weight").replace(".", "_") for name in names}


def transformer_names(names: list[str]) -> dict[str, str]:
    """The diffusers (PEFT) module key of each transformer weight name."""
    return {name: TRANSFORMER_PREFIX + name.removesuffix(".weight") for name in names}


def is_unet(denoiser: nn.Module) -> bool:
    """Whether the denoiser is a UNet (its LoRA in kohya's format) rather than a transformer (diffusers' format)."""
    from diffusers import UNet2DConditionModel

    return isinstance(denoiser, UNet2DConditionModel)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(lora_down, lora_up, rank kept, squared Frobenius norm of the SVD tail) of one weight delta. A layer whose whole
    rank is below `rank` is zero-padded to it: one rank and alpha for every layer is scale 1 in every loader (diffusers
    keys the alphas of attention layers under names its PEFT config does not match, and then uses the commonest)."""
    u, s, vh = torch.linalg.svd(delta.flatten(1).float(), full_matrices=False)
    kept = min(rank, len(s))
    root = s[:kept].sqrt()
    down = delta.new_zeros(rank, *delta.shape[1:], dtype=torch.float32)
    up = delta.new_zeros(delta.shape[0], rank, *[1] * (delta.dim() - 2), dtype=torch.float32)  # a conv's up is 1x1
    down[:kept] = (root[:, None] * vh[:kept]).reshape(kept, *delta.shape[1:])
    up[:, :kept] = (u[:, :kept] * root).reshape(delta.shape[0], kept, *up.shape[2:])
    return down, up, kept, float(s[kept:].square().sum())


@dataclass
class Lora:
    """The LoRA of an edit: its tensors, which denoiser weight each module patches, and what it leaves out."""

    tensors: dict[str, torch.Tensor]
    modules: dict[str, str]  # denoiser weight name → module key
    record: dict
    format: Format = KOHYA

    def edit(self, denoiser: nn.Module) -> MaskEdit:
        """The edit loading this LoRA at scale 1 makes: W + up·down on its layers, nothing on biases and norms."""
        params = dict(denoiser.named_parameters())
        new = {}
        with torch.no_grad():
            for name, key in self.modules.items():
                up, down = (self.tensors[f"{key}.{side}"].flatten(1).float() for side in (self.format.up, self.format.down))
                new[name] = params[name] + (up @ down).reshape(params[name].shape).to(params[name])
        return MaskEdit.from_weights(new, {name: params[name] for name in new})


def to_lora(denoiser: nn.Module, edit: MaskEdit, rank: int | str) -> Lora:
    """The LoRA of `edit` (not applied) on `denoiser` (a UNet: kohya's format; a transformer: diffusers') at `rank`,
    with its share of the edit left out in `record`."""
    modules, params = dict(denoiser.named_modules()), dict(denoiser.named_parameters())
    names = [name for name in edit.masks if name.endswith(".weight") and isinstance(
        modules[name.removesuffix(".weight")], (nn.Linear, nn.Conv2d))]
    form = KOHYA if is_unet(denoiser) else DIFFUSERS
    keys = kohya_names(denoiser, names) if form is KOHYA else transformer_names(names)
    if not keys:
        raise EraseError("this edit changes no Linear or Conv2d weight, so it has no LoRA: drop --lora and share the "
                         "patch or the single file")
    width = max(min(params[name].flatten(1).shape) for name in keys) if rank == FULL else rank
    tensors, energy, ranks, tails = {}, {}, {}, {}
    for name, delta in edit.deltas(denoiser):
        energy[name] = float(delta.float().square().sum())
        if name in keys and energy[name] > 0:
            down, up, ranks[name], tails[name] = low_rank(delta, width)
            tensors.update({f"{keys[name]}.{form.down}": down.to(delta.dtype).contiguous().cpu(),
                            f"{keys[name]}.{form.up}": up.to(delta.dtype).contiguous().cpu()})
            if form is KOHYA:
                tensors[f"{keys[name]}.alpha"] = torch.tensor(float(width))  # alpha = rank: scale 1
    modules = {name: key for name, key in keys.items() if name in ranks}
    return Lora(tensors, modules, {"format": form.name, "rank": rank, "file_rank": width,
                                   **_left_out(energy, ranks, tails)}, form)


def _left_out(energy: dict, ranks: dict, tails: dict) -> dict:
    """The record: each share is a Frobenius norm over the whole edit's (squares add: dropped² = by rank² + not LoRA²)."""
    total = sum(energy.values()) or 1.0
    not_lora = {name: e for name, e in energy.items() if name not in ranks and e > 0}
    tail = sum(tails.values())
    return {"delta_norm": math.sqrt(total), "dropped": math.sqrt((tail + sum(not_lora.values())) / total),
            "dropped_by_rank": math.sqrt(tail / total), "dropped_not_lora": math.sqrt(sum(not_lora.values()) / total),
            "layers": {name.removesuffix(".weight"): {"rank": ranks[name], "norm": math.sqrt(energy[name]),
                                                      "dropped": math.sqrt(tails[name] / energy[name])} for name in ranks},
            "not_lora": {name: math.sqrt(e) for name, e in not_lora.items()}}


def summary(record: dict) -> str:
    """One console line from erase.json's `lora`: the file, its rank and the share of the edit it leaves out."""
    return (f"LoRA {record['name']} (rank {record['rank']}, {len(record['layers'])} layers): leaves out "
            f"{100 * record['dropped']:.3g}% of the edit's Frobenius norm: {100 * record['dropped_by_rank']:.3g}% by "
            f"rank truncation, {100 * record['dropped_not_lora']:.3g}% in biases and norms (not LoRA-able)")


def save_lora(path: Path, lora: Lora, metadata: dict) -> None:
    """Write the LoRA with `metadata` (and, in kohya's format, its network fields) in the safetensors header."""
    width = lora.record["file_rank"]
    kohya = {"ss_network_module": "networks.lora", "ss_network_dim": width, "ss_network_alpha": width}
    header = {**(kohya if lora.format is KOHYA else {}), **metadata}
    save_file(lora.tensors, str(path), metadata=encode_header(header))


def lora_name(out: Path, rank: int | str) -> str:
    return f"{out.name}-lora-{'full' if rank == FULL else f'r{rank}'}.safetensors"
