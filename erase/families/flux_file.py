"""Flux.1 single files: the transformer alone in Black Forest Labs' layout (`flux1-dev.safetensors`), the file
ComfyUI's "Load Diffusion Model" and Forge read, and diffusers' `FluxTransformer2DModel.from_single_file`.

diffusers ships only the BFL → diffusers conversion (`convert_flux_transformer_checkpoint_to_diffusers`); its
inverse is written here as one table: each BFL tensor and the diffusers tensors it holds, concatenated along the
first axis (q, k and v fused into `qkv`; a single block's q, k, v and MLP input fused into `linear1`). The final
adaLN projection has its halves swapped: BFL orders it (shift, scale), diffusers (scale, shift). Both readers take
Flux.1's widths for granted (3072 hidden, 4096 text in ComfyUI; diffusers splits `linear1` at 3072): a narrower
transformer is written the same way, but neither loads it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import EraseError
from ..export import encode_header

CONFIGS = Path(__file__).parent.parent / "model_configs"
DEV, SCHNELL = CONFIGS / "flux-dev", CONFIGS / "flux-schnell"
COMFY_PREFIX = "model.diffusion_model."  # all-in-one checkpoints nest the transformer under it

# BFL module → the diffusers module(s) it holds, in the order they are concatenated.
EMBEDDERS = {"img_in": "x_embedder", "txt_in": "context_embedder",
             "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
             "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
             "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
             "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
GUIDANCE = {"guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",  # dev only
            "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
          "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
          "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
          "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": "proj_out",
          "modulation.lin": "norm.linear"}
# RMS norms: BFL `<norm>.scale` holds diffusers `<norm>.weight`.
DOUBLE_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
SWAPPED = "final_layer.adaLN_modulation.1."


def _in_block(table: dict, bfl: str, diffusers: str) -> dict[str, tuple[str, ...]]:
    return {f"{bfl}.{k}": tuple(f"{diffusers}.{n}" for n in ((v,) if isinstance(v, str) else v))
            for k, v in table.items()}


def bfl_layout(config) -> dict[str, tuple[str, ...]]:
    """BFL tensor name → the diffusers tensor names it holds, concatenated in this order, for a
    FluxTransformer2DModel config."""
    linear = {k: (v,) for k, v in EMBEDDERS.items()}
    norms = {}
    if config["guidance_embeds"]:
        linear.update({k: (v,) for k, v in GUIDANCE.items()})
    for i in range(config["num_layers"]):
        linear.update(_in_block(DOUBLE, f"double_blocks.{i}", f"transformer_blocks.{i}"))
        norms.update(_in_block(DOUBLE_NORMS, f"double_blocks.{i}", f"transformer_blocks.{i}"))
    for i in range(config["num_single_layers"]):
        linear.update(_in_block(SINGLE, f"single_blocks.{i}", f"single_transformer_blocks.{i}"))
        norms.update(_in_block(SINGLE_NORMS, f"single_blocks.{i}", f"single_transformer_blocks.{i}"))
    table = {f"{bfl}.{end}": tuple(f"{n}.{end}" for n in names) for bfl, names in linear.items()
             for end in ("weight", "bias")}
    table.update({f"{bfl}.scale": (f"{name}.weight",) for bfl, (name,) in norms.items()})
    return table


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


def transformer_state(transformer) -> dict[str, torch.Tensor]:
    """The FluxTransformer2DModel's state dict in the BFL layout (works on the meta device too)."""
    state = transformer.state_dict()
    out = {}
    for bfl, names in bfl_layout(transformer.config).items():
        tensor = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]
        out[bfl] = _swap_halves(tensor) if bfl.startswith(SWAPPED) else tensor
    return out


READER_WIDTH = 3072
"""Flux.1's hidden width, which diffusers' converter and ComfyUI assume when they split a BFL file's fused tensors."""


def unsupported(pipe) -> str | None:
    """Why this pipeline's transformer has no BFL file (not a Flux.1 transformer, or a tensor the layout cannot
    name), or None when it has one."""
    transformer = getattr(pipe, "transformer", None)
    if type(transformer).__name__ != "FluxTransformer2DModel":
        return (f"the BFL Flux layout holds a FluxTransformer2DModel, not {type(transformer).__name__}: use the "
                "diffusers transformer/ folder or the patch")
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if width != READER_WIDTH:  # both readers split the fused projections at Flux.1's own width
        return (f"diffusers and ComfyUI read BFL Flux files only at Flux.1's width ({READER_WIDTH}), and this "
                f"transformer is {width} wide: use the diffusers transformer/ folder or the patch")
    held = {name for names in bfl_layout(transformer.config).values() for name in names}
    missing = [name for name in transformer.state_dict() if name not in held]
    if missing:
        return (f"the BFL Flux layout has no name for transformer.{missing[0]} (a Flux.1 transformer file cannot hold "
                "this model): use the diffusers transformer/ folder or the patch")
    return None


def save_single_file(pipe, path: Path, metadata: dict, half: bool = False) -> None:
    """Write the transformer in the BFL layout (optionally fp16) with `metadata` (JSON-encoded values) in the
    safetensors header. The text encoders and the VAE stay out: ComfyUI and Forge load them from their own files."""
    reason = unsupported(pipe)
    if reason:
        raise EraseError(reason)
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in transformer_state(pipe.transformer).items()}
    save_file(state, str(path), metadata=encode_header(metadata))


def _transformer_keys(keys) -> set[str]:
    """The transformer's tensor names in a file: those under `model.diffusion_model.` in an all-in-one checkpoint."""
    keys = list(keys)
    nested = [key for key in keys if key.startswith(COMFY_PREFIX)]
    return {key.removeprefix(COMFY_PREFIX) for key in nested} if nested else set(keys)


def config_for(keys) -> Path | None:
    """The shipped config folder of the Flux.1 transformer whose keys these are (with or without the
    `model.diffusion_model.` prefix): dev has a guidance embedding, schnell none. None: not a Flux.1 transformer
    (Flux.2 and Chroma have no `vector_in`)."""
    names = _transformer_keys(keys)
    if not {"double_blocks.0.img_attn.norm.key_norm.scale", "vector_in.in_layer.weight"} <= names:
        return None
    return DEV if "guidance_in.in_layer.weight" in names else SCHNELL


def _check_tensors(keys: set[str], config, path: Path, config_dir: Path) -> None:
    """Refuse a BFL file that lacks a tensor of the config's architecture or holds one it has not: diffusers would
    leave the first unloaded and drop the second (a dev file read as schnell loses its guidance embedding)."""
    layout = bfl_layout(config)
    missing = [key for key in layout if key not in keys]
    extra = sorted(keys - set(layout))
    if missing or extra:
        what = f"the file lacks {missing[0]}" if missing else f"the architecture has no {extra[0]}"
        raise EraseError(f"{path.name} does not fit the {config_dir.name} architecture ({what}; {len(missing)} tensors "
                         f"missing, {len(extra)} extra): pass --model-config with the diffusers folder of its base model")


def load_transformer(path: Path, config_dir: Path, torch_dtype=None):
    """The FluxTransformer2DModel of a BFL (or ComfyUI all-in-one) file, read by diffusers' own converter with the
    config of `config_dir` (a diffusers pipeline folder), offline. diffusers' converter takes only Flux.1's width
    (3072): a narrower transformer is refused."""
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    path, config_dir = Path(path), Path(config_dir)
    try:
        config = FluxTransformer2DModel.load_config(str(config_dir), subfolder="transformer", local_files_only=True)
        with safe_open(str(path), framework="pt") as f:
            keys = _transformer_keys(f.keys())
        if config_for(keys) is not None:  # a BFL file (a diffusers-named one is diffusers' to check)
            _check_tensors(keys, config, path, config_dir)
        return FluxTransformer2DModel.from_single_file(str(path), config=str(config_dir), subfolder="transformer",
                                                       local_files_only=True, torch_dtype=torch_dtype)
    except EraseError:
        raise
    except Exception as exc:
        raise EraseError(f"{path.name} could not be loaded as a Flux.1 transformer ({exc}); pass --model-config "
                         "with the diffusers folder of its base model") from exc
