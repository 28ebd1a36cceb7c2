"""Single-file checkpoints in the original Stable Diffusion layout (A1111, ComfyUI, diffusers' from_single_file).

diffusers ships only the original → diffusers conversion; the reverse is written here as data: renames inside
a block (tables below) and a block-prefix table derived from the UNet/VAE/text-encoder config. SD1.x, SD2.x and
SDXL; the round trip through `from_single_file` is what the tests check.

A pipeline loaded from a single file keeps, as `pipe.carried_tensors`, the source file's OpenCLIP tensors that
diffusers' text encoder has no place for (SD2.x's 24th text layer: diffusers keeps 23, as SD2 reads the penultimate
layer); a single file written from that pipeline holds them again, so a loader built on OpenCLIP's full text tower
(ComfyUI) finds every layer it expects.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import EraseError
from .export import encode_header

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_TEXT, SDXL_TEXT_2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."

# diffusers name → original name, inside a block.
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_FIXED = {"conv_norm_out": "norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}
# OpenCLIP's text transformer (SD2.x's cond_stage_model.model, SDXL's conditioner.embedders.1.model); q, k and v are
# fused into attn.in_proj_* before renaming, position and projection are bare tensors (see open_clip_layout).
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn": "attn", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj"}
OPEN_CLIP_FIXED = {"embeddings.token_embedding": "token_embedding", "final_layer_norm": "ln_final",
                   "embeddings.position_embedding": "positional_embedding", "text_projection": "text_projection"}


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
            upsampler = f"output_blocks.{b * per_level + per_level - 1}.{2 if attention else 1}.conv"
            table[f"up_blocks.{b}.upsamplers.0.conv"] = (upsampler, {})
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
    table.update({name: (name, {}) for name in ("quant_conv", "post_quant_conv")})
    return table


def open_clip_prefixes(config) -> dict[str, tuple[str, dict]]:
    table = {f"encoder.layers.{i}": (f"transformer.resblocks.{i}", OPEN_CLIP_LAYER)
             for i in range(config.num_hidden_layers)}
    table.update({k: (v, {}) for k, v in OPEN_CLIP_FIXED.items()})
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


def unmapped(state: dict, table: dict[str, tuple[str, dict]]) -> list[str]:
    """Keys under no table prefix: tensors the original layout has no name for."""
    return [key for key in state if not any(key.startswith(prefix + ".") for prefix in table)]


def clip_layout(text_encoder) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (SD1.x, SDXL's first encoder): transformers' own names under `text_model.`."""
    return {"text_model." + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def open_clip_layout(text_encoder) -> dict[str, torch.Tensor]:
    """OpenCLIP (SD2.x, SDXL's second encoder): q/k/v fused into in_proj, `positional_embedding` and the transposed
    `text_projection` as bare tensors."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    fused = {}
    for key, tensor in state.items():
        layer, _, inner = key.partition(".self_attn.")  # inner: q_proj.weight, out_proj.bias, ... or ""
        proj, _, kind = inner.partition("_proj.")
        if proj == "q":
            fused[f"{layer}.self_attn.in_proj_{kind}"] = torch.cat([state[f"{layer}.self_attn.{p}_proj.{kind}"]
                                                                    for p in "qkv"])
        elif proj not in ("k", "v"):
            fused[key] = tensor
    out = rename(fused, open_clip_prefixes(text_encoder.config))
    out["positional_embedding"] = out.pop("positional_embedding.weight")
    if "text_projection.weight" in out:
        out["text_projection"] = out.pop("text_projection.weight").T
    return out


def open_clip_dropped(keys: list[str], pipe) -> list[str]:
    """Keys of the OpenCLIP text tower(s) in a checkpoint that the pipeline's text encoder drops: resblocks past its
    depth, and the bare `text_projection` / `logit_scale` (diffusers reads neither into a CLIPTextModel)."""
    dropped = []
    for prefix, layout, encoder in text_layouts(pipe):
        if layout is not open_clip_layout:
            continue
        for key in keys:
            inner = key[len(prefix):] if key.startswith(prefix) else None
            block = re.match(r"transformer\.resblocks\.(\d+)\.", inner or "")
            if inner in ("text_projection", "logit_scale") or (block and int(block[1]) >= encoder.config.num_hidden_layers):
                dropped.append(key)
    return dropped


def carried_tensors(path: Path, keys: list[str], pipe) -> dict[str, torch.Tensor]:
    """The tensors of the single file at `path` that the pipeline loaded from it dropped (see open_clip_dropped), in
    the original layout: what a single file written from the pipeline carries through."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in open_clip_dropped(keys, pipe)}


def text_layouts(pipe) -> list[tuple[str, object, object]]:
    """(original prefix, layout function, text encoder) of each text encoder: SD1.x, SD2.x or SDXL."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return [(SDXL_TEXT, clip_layout, pipe.text_encoder), (SDXL_TEXT_2, open_clip_layout, pipe.text_encoder_2)]
    if pipe.unet.config.use_linear_projection:  # SD2.x, as A1111 and ComfyUI tell it from SD1.x: OpenCLIP
        return [(SD2_TEXT, open_clip_layout, pipe.text_encoder)]
    return [(SD1_TEXT, clip_layout, pipe.text_encoder)]


def unsupported(pipe) -> str | None:
    """Why this pipeline has no single-file export (a tensor the original layout cannot name, a text encoder that is
    not CLIP), or None when it has one."""
    for name, table in (("unet", unet_block_prefixes(pipe.unet.config)), ("vae", vae_block_prefixes(pipe.vae.config))):
        missing = unmapped(getattr(pipe, name).state_dict(), table)
        if missing:
            return (f"the original Stable Diffusion layout has no name for {name}.{missing[0]} (an SD1.x, SD2.x or "
                    "SDXL single file cannot hold this model): use the diffusers unet/ folder or the patch")
    for _, _, encoder in text_layouts(pipe):
        if type(encoder).__name__ not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            return (f"the original Stable Diffusion layout holds CLIP text encoders, not {type(encoder).__name__}: "
                    "use the diffusers unet/ folder or the patch")
    return None


def vae_layout(vae) -> dict[str, torch.Tensor]:
    """The VAE in the original LDM layout (SD1.x, SD2.x, SDXL and SD3 files alike)."""
    out = rename(vae.state_dict(), vae_block_prefixes(vae.config))
    for key, tensor in out.items():  # the original VAE attention uses 1x1 convolutions
        if ".mid.attn_1." in key and key.endswith("weight") and tensor.dim() == 2:
            out[key] = tensor[:, :, None, None]
    return out


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) as one state dict in the original SD layout."""
    reason = unsupported(pipe)
    if reason:
        raise EraseError(reason)
    unet = rename(pipe.unet.state_dict(), unet_block_prefixes(pipe.unet.config))
    state = {UNET_PREFIX + k: v for k, v in unet.items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_layout(pipe.vae).items()})
    for prefix, layout, encoder in text_layouts(pipe):
        state.update({prefix + k: v for k, v in layout(encoder).items()})
    dtype = pipe.text_encoder.dtype
    state.update({k: v.to(dtype) for k, v in getattr(pipe, "carried_tensors", {}).items() if k not in state})
    return state


def save_single_file(pipe, path: Path, metadata: dict, half: bool = False) -> None:
    """Write the checkpoint (optionally fp16) with `metadata` (JSON-encoded values) in the safetensors header."""
    state = original_state_dict(pipe)
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(path), metadata=encode_header(metadata))
