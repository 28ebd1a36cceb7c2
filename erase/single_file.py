"""Single-file checkpoints in the original Stable Diffusion layout (A1111, ComfyUI, diffusers' from_single_file).

diffusers ships only the original → diffusers conversion; the reverse is written here as data: renames inside
a block (tables below) and a block-prefix table derived from the UNet/VAE config. The round trip through
`from_single_file` is what the tests check.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import EraseError

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

# diffusers name → original name, inside a block.
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_FIXED = {"conv_norm_out": "norm_out"}


def unet_block_prefixes(config) -> dict[str, tuple[str, dict]]:
    """diffusers block prefix → (original prefix, inner renames), for any UNet2DConditionModel config."""
    per_level = config["layers_per_block"] + 1
    table: dict[str, tuple[str, dict]] = {}
    levels = len(config["down_block_types"])
    for b, kind in enumerate(config["down_block_types"]):
        for j in range(config["layers_per_block"]):
            index = 1 + b * per_level + j
            table[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{index}.0", RESNET)
            if kind.startswith("CrossAttn"):
                table[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{index}.1", {})
        if b < levels - 1:
            table[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{(b + 1) * per_level}.0.op", {})
    table["mid_block.resnets.0"] = ("middle_block.0", RESNET)
    table["mid_block.attentions.0"] = ("middle_block.1", {})
    table["mid_block.resnets.1"] = ("middle_block.2", RESNET)
    for b, kind in enumerate(config["up_block_types"]):
        attention = kind.startswith("CrossAttn")
        for j in range(per_level):
            table[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{b * per_level + j}.0", RESNET)
            if attention:
                table[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{b * per_level + j}.1", {})
        if b < levels - 1:
            table[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{b * per_level + per_level - 1}."
                                                         f"{2 if attention else 1}.conv", {})
    table.update({k: (v, {}) for k, v in UNET_FIXED.items()})
    return table


def vae_block_prefixes(config) -> dict[str, tuple[str, dict]]:
    levels = len(config["down_block_types"])
    table: dict[str, tuple[str, dict]] = {}
    for b in range(levels):
        for j in range(config["layers_per_block"]):
            table[f"encoder.down_blocks.{b}.resnets.{j}"] = (f"encoder.down.{b}.block.{j}", VAE_RESNET)
        if b < levels - 1:
            table[f"encoder.down_blocks.{b}.downsamplers.0.conv"] = (f"encoder.down.{b}.downsample.conv", {})
        for j in range(config["layers_per_block"] + 1):
            table[f"decoder.up_blocks.{b}.resnets.{j}"] = (f"decoder.up.{levels - 1 - b}.block.{j}", VAE_RESNET)
        if b < levels - 1:
            table[f"decoder.up_blocks.{b}.upsamplers.0.conv"] = (f"decoder.up.{levels - 1 - b}.upsample.conv", {})
    for coder in ("encoder", "decoder"):
        for k in range(2):
            table[f"{coder}.mid_block.resnets.{k}"] = (f"{coder}.mid.block_{k + 1}", VAE_RESNET)
        table[f"{coder}.mid_block.attentions.0"] = (f"{coder}.mid.attn_1", VAE_ATTENTION)
        table.update({f"{coder}.{k}": (f"{coder}.{v}", {}) for k, v in VAE_FIXED.items()})
    return table


def rename(state: dict[str, torch.Tensor], table: dict[str, tuple[str, dict]]) -> dict[str, torch.Tensor]:
    """Original-layout keys for a diffusers state dict; keys under no table prefix keep their name."""
    prefixes = sorted(table, key=len, reverse=True)  # the longest prefix wins (resnets.1 vs resnets.10)
    out = {}
    for key, tensor in state.items():
        prefix = next((p for p in prefixes if key.startswith(p + ".")), None)
        if prefix is None:
            out[key] = tensor
            continue
        target, inner = table[prefix]
        rest = key[len(prefix) + 1:]
        for old, new in inner.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[f"{target}.{rest}"] = tensor
    return out


def unsupported(pipe) -> str | None:
    """Why this pipeline has no single-file export, or None when it has one (SD1.x layouts)."""
    if hasattr(pipe, "text_encoder_2") or pipe.unet.config.use_linear_projection:
        return ("single-file export supports SD1.x pipelines (SD2's and SDXL's OpenCLIP text encoders need another "
                "layout): use the diffusers unet/ folder or the patch")
    return None


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder as one state dict in the original SD1.x layout."""
    reason = unsupported(pipe)
    if reason:
        raise EraseError(reason)
    unet = rename(pipe.unet.state_dict(), unet_block_prefixes(pipe.unet.config))
    vae = rename(pipe.vae.state_dict(), vae_block_prefixes(pipe.vae.config))
    for key, tensor in vae.items():  # the original VAE attention uses 1x1 convolutions
        if ".mid.attn_1." in key and key.endswith("weight") and tensor.dim() == 2:
            vae[key] = tensor[:, :, None, None]
    text = {f"text_model.{k}" if not k.startswith("text_model.") else k: v
            for k, v in pipe.text_encoder.state_dict().items()}
    state = {UNET_PREFIX + k: v for k, v in unet.items()}
    state.update({VAE_PREFIX + k: v for k, v in vae.items()})
    state.update({TEXT_PREFIX + k: v for k, v in text.items()})
    return state


def save_single_file(pipe, path: Path, metadata: dict, half: bool = False) -> None:
    """Write the checkpoint (optionally fp16) with `metadata` (JSON-encoded values) in the safetensors header."""
    state = original_state_dict(pipe)
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().contiguous().cpu() for k, v in state.items()}
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    save_file(state, str(path), metadata=header)
