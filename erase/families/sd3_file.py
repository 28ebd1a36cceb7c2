"""SD3 / SD3.5 single files in the layout Stability AI released them in and ComfyUI loads and saves.

One file holds the whole pipeline: the MMDiT under `model.diffusion_model.` (`joint_blocks.N.{x_block,
context_block}`, q/k/v fused), the VAE under `first_stage_model.`, and the text encoders under
`text_encoders.{clip_l,clip_g,t5xxl}.transformer.` with transformers' own names (T5 only when the pipeline has it:
SD3 runs without it). The transformer's layout is the exact inverse of diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers`; the round trip through `from_single_file` is what the tests check.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import EraseError
from ..export import encode_header
from ..single_file import UNET_PREFIX as MODEL_PREFIX
from ..single_file import VAE_PREFIX, rename, unmapped, vae_block_prefixes, vae_layout

CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"
CLIP_L, CLIP_G = "text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer."
T5 = "text_encoders.t5xxl.transformer."
TEXT_ENCODERS = {"text_encoder": (CLIP_L, "CLIPTextModelWithProjection", "CLIP-L"),
                 "text_encoder_2": (CLIP_G, "CLIPTextModelWithProjection", "CLIP-G"),
                 "text_encoder_3": (T5, "T5EncoderModel", "T5")}  # T5 is optional

# diffusers name → SAI name, inside joint block N (q/k/v already fused into attn.qkv, attn.add_qkv, attn2.qkv).
BLOCK = {"attn.qkv": "x_block.attn.qkv", "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
         "attn.to_out.0": "x_block.attn.proj", "attn.add_qkv": "context_block.attn.qkv",
         "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
         "attn.to_add_out": "context_block.attn.proj", "attn2.qkv": "x_block.attn2.qkv",
         "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k", "attn2.to_out.0": "x_block.attn2.proj",
         "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
         "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
         "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
FIXED = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
         "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
         "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
         "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
         "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
         "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
POSITIONS = "pos_embed.pos_embed"  # a bare tensor: `pos_embed` in the SAI layout
QKV = re.compile(r"(?P<attn>.*\.attn2?)\.(?P<style>to_|add_)(?P<part>[qkv])(?:_proj)?\.(?P<kind>weight|bias)$")

# The shipped configs, told apart by the transformer's keys: SD3.5 medium alone has dual attention (attn2) and SD3.5
# large is 38 blocks; both have q/k RMS norms, which SD3 medium (24 blocks) lacks.
SHIPPED = {"sd35-medium": (24, True, True), "sd35-large": (38, True, False), "sd3-medium": (24, False, False)}


def transformer_table(config) -> dict[str, tuple[str, dict]]:
    """diffusers block prefix → (SAI prefix, inner renames), for any SD3Transformer2DModel config."""
    table = {f"transformer_blocks.{i}": (f"joint_blocks.{i}", BLOCK) for i in range(config.num_layers)}
    table.update({name: (original, {}) for name, original in FIXED.items()})
    return table


def fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """q, k and v of each attention as one `qkv` tensor (q, k, v stacked), as the SAI layout holds them."""
    out = {}
    for key, tensor in state.items():
        match = QKV.fullmatch(key)
        if match is None:
            out[key] = tensor
        elif match["part"] == "q":
            parts = [state[key.replace(f".{match['style']}q", f".{match['style']}{p}", 1)] for p in "kv"]
            name = "add_qkv" if match["style"] == "add_" else "qkv"
            out[f"{match['attn']}.{name}.{match['kind']}"] = torch.cat([tensor, *parts])
    return out


def unnamed(state: dict[str, torch.Tensor], table: dict[str, tuple[str, dict]]) -> list[str]:
    """Keys of a (q/k/v-fused) diffusers state that the SAI layout has no name for."""
    prefixes = sorted(table, key=len, reverse=True)
    missing = []
    for key in state:
        prefix = next((p for p in prefixes if key.startswith(p + ".")), None)
        if prefix is None:
            named = key == POSITIONS
        else:
            inner = table[prefix][1]
            named = not inner or any(key[len(prefix) + 1:].startswith(old + ".") for old in inner)
        if not named:
            missing.append(key)
    return missing


def swap_scale_shift(tensor: torch.Tensor) -> torch.Tensor:
    """SAI's final modulations give (shift, scale), diffusers' (scale, shift): swapping halves is its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def transformer_layout(transformer) -> dict[str, torch.Tensor]:
    """The MMDiT's tensors under their SAI names (without `model.diffusion_model.`)."""
    config = transformer.config
    state = fuse_qkv(transformer.state_dict())
    out = rename({k: v for k, v in state.items() if k != POSITIONS}, transformer_table(config))
    out["pos_embed"] = state[POSITIONS]
    # diffusers swaps the halves of the modulations that feed AdaLayerNormContinuous: the last block's context
    # (pre-only) and the final layer's.
    for module in (f"joint_blocks.{config.num_layers - 1}.context_block.adaLN_modulation.1",
                   "final_layer.adaLN_modulation.1"):
        for kind in ("weight", "bias"):
            out[f"{module}.{kind}"] = swap_scale_shift(out[f"{module}.{kind}"])
    return out


def clip_layout(text_encoder) -> dict[str, torch.Tensor]:
    """A CLIP text encoder with projection in transformers' names: the tower under `text_model.`, `text_projection`
    beside it. CLIP-L's projection is written as held; SD3 pools CLIP-L unprojected, so every loader (ComfyUI,
    diffusers' from_single_file) uses the identity there, as SD3's own CLIP-L has."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
            for k, v in text_encoder.state_dict().items()}


def t5_layout(text_encoder) -> dict[str, torch.Tensor]:
    """T5's encoder in transformers' names; the input embedding once, as `shared` (tied to encoder.embed_tokens)."""
    return {k: v for k, v in text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}


def unsupported(pipe) -> str | None:
    """Why this pipeline has no SD3 single file (a tensor the layout cannot name, a text encoder it cannot hold),
    or None when it has one."""
    transformer = pipe.transformer
    if type(transformer).__name__ != "SD3Transformer2DModel":
        return f"the SD3 single-file layout holds an SD3Transformer2DModel, not {type(transformer).__name__}"
    if transformer.config.pos_embed_max_size is None:
        return ("the SD3 single-file layout holds the transformer's position table, which this one computes on the fly "
                "(pos_embed_max_size is None): use the diffusers folder or the patch")
    missing = unnamed(fuse_qkv(transformer.state_dict()), transformer_table(transformer.config))
    if missing:
        return (f"the SD3 single-file layout has no name for transformer.{missing[0]}: use the diffusers folder or "
                "the patch")
    missing = unmapped(pipe.vae.state_dict(), vae_block_prefixes(pipe.vae.config))
    if missing:
        return f"the SD3 single-file layout has no name for vae.{missing[0]}: use the diffusers folder or the patch"
    for name, (_, expected, _) in TEXT_ENCODERS.items():
        encoder = getattr(pipe, name, None)
        if type(encoder).__name__ != expected and not (encoder is None and name == "text_encoder_3"):
            return (f"the SD3 single-file layout holds a {expected} as {name}, not {type(encoder).__name__}: use the "
                    "diffusers folder or the patch")
    return None


def single_file_state(pipe) -> dict[str, torch.Tensor]:
    """The whole SD3 pipeline as one state dict in the SAI/ComfyUI checkpoint layout."""
    reason = unsupported(pipe)
    if reason:
        raise EraseError(reason)
    state = {MODEL_PREFIX + k: v for k, v in transformer_layout(pipe.transformer).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_layout(pipe.vae).items()})
    state.update({CLIP_L + k: v for k, v in clip_layout(pipe.text_encoder).items()})
    state.update({CLIP_G + k: v for k, v in clip_layout(pipe.text_encoder_2).items()})
    if pipe.text_encoder_3 is not None:
        state.update({T5 + k: v for k, v in t5_layout(pipe.text_encoder_3).items()})
    return state


def save_single_file(pipe, path: Path, metadata: dict, half: bool = False) -> None:
    """Write the checkpoint (optionally fp16) with `metadata` (JSON-encoded values) in the safetensors header."""
    state = single_file_state(pipe)
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(path), metadata=encode_header(metadata))


def config_for(keys) -> Path | None:
    """The shipped SD3 config whose transformer these checkpoint keys are (SD3 medium, SD3.5 medium or large), or
    None when they are none of them."""
    keys = set(keys)
    blocks = {int(k.split(".")[3]) for k in keys if k.startswith(MODEL_PREFIX + "joint_blocks.")}
    if not blocks:
        return None
    qk_norm = MODEL_PREFIX + "joint_blocks.0.x_block.attn.ln_q.weight" in keys
    dual = MODEL_PREFIX + "joint_blocks.0.x_block.attn2.qkv.weight" in keys
    shape = (len(blocks), qk_norm, dual)
    return next((CONFIGS / name for name, known in SHIPPED.items() if known == shape), None)


def load_single_file(path: Path, config_dir: Path, torch_dtype: torch.dtype | None = None):
    """An SD3 single file as a StableDiffusion3Pipeline, offline: configs from `config_dir` (a diffusers folder of
    configs, or of a whole base model), CLIP tokenizers built by erase. Without T5 in the file (nor weights for it in
    `config_dir`) the pipeline runs without T5, as SD3 can."""
    from diffusers import StableDiffusion3Pipeline

    from ..models import clip_tokenizer  # erase.models loads single files through this module

    path, config_dir = Path(path), Path(config_dir)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    extra = {"tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer()}
    for name, (prefix, _, label) in TEXT_ENCODERS.items():
        if any(k.startswith(prefix) for k in keys) or any((config_dir / name).glob("*.safetensors")):
            continue  # diffusers takes it from the file, or else from the base model's folder
        if name != "text_encoder_3":
            raise EraseError(f"{path.name} holds no {label} text encoder and {config_dir} has no weights for it: pass "
                             "--model-config with the diffusers folder of its base model")
        extra.update(text_encoder_3=None, tokenizer_3=None)
    if "text_encoder_3" not in extra and not (config_dir / "tokenizer_3").is_dir():
        raise EraseError(f"{path.name} needs a T5 tokenizer, which erase cannot build offline and {config_dir} lacks "
                         "(tokenizer_3/): pass --model-config with the diffusers folder of its base model")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    pipe = StableDiffusion3Pipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                     **extra, **kwargs)
    if pipe.text_encoder_3 is not None:
        # diffusers builds a T5 from a file without tying its input embedding (held once, as `shared`) and leaves it
        # in training mode, with dropout on.
        pipe.text_encoder_3.tie_weights()
        pipe.text_encoder_3.eval()
    return pipe
