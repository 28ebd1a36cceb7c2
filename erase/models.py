"""Model loading: the shipped miniature pipeline, hub ids, local diffusers folders and single-file checkpoints.

Nothing here reaches for the network unless the user's environment allows it: hub ids are resolved from the
local cache first, and single-file checkpoints are configured from the configs shipped with the package.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import torch

from .errors import EraseError

MINI_DIR = Path(__file__).parent / "assets" / "mini"
MINI_PIPELINE_DIR = MINI_DIR / "pipeline"
SINGLE_FILE_CONFIGS = Path(__file__).parent / "model_configs"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@functools.lru_cache(maxsize=1)
def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    units = list(bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(max_length: int = 77):
    """The exact CLIP BPE tokenizer of Stable Diffusion (49,408 tokens), built offline from open_clip's BPE file."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    # transformers 5 ignores vocab_file=/merges_file= keywords: pass the vocabulary itself.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)


def image_side(pipe, resolution: int | None = None) -> int:
    """The generated image's side in pixels: `resolution`, or the model's default."""
    return resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise EraseError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def check_device(device: str, dtype: torch.dtype | None) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EraseError(f"device {device!r} is not available on this machine: pass --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise EraseError("device 'mps' is not available on this machine: pass --device cpu")
    if device == "cpu" and dtype == torch.float16:
        raise EraseError("float16 is not supported for inference on the CPU: pass --dtype float32 or bfloat16")


def load_pipeline(model: str | Path = "mini", device: str = "cpu", dtype: str | torch.dtype | None = None,
                  config: str | Path | None = None):
    """Load a Stable Diffusion pipeline.

    model: "mini" (the embedded miniature world), a hub id available in the local cache, a local diffusers
    folder, or a single-file ``.safetensors`` checkpoint (configured from ``config``, a local diffusers folder,
    or from the configs shipped with erase when the architecture is recognised).
    """
    from diffusers import DiffusionPipeline

    torch_dtype = resolve_dtype(dtype)
    check_device(device, torch_dtype)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    ref = str(model)
    path = Path(ref).expanduser()
    if ref == "mini":
        if not (MINI_PIPELINE_DIR / "model_index.json").is_file():
            raise EraseError(f"the miniature model is not installed at {MINI_PIPELINE_DIR}: "
                             "reinstall erase, or build it with scripts/train_mini.py")
        pipe = DiffusionPipeline.from_pretrained(MINI_PIPELINE_DIR, **kwargs)
    elif path.suffix in (".safetensors", ".ckpt", ".pt", ".bin") or path.is_file():
        pipe = _load_single_file(path, config, kwargs)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise EraseError(f"{path} is not a diffusers pipeline folder (no model_index.json): "
                             "pass a Stable Diffusion folder saved with save_pretrained, or a .safetensors file")
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    elif ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise EraseError(f"model {ref!r} does not exist: pass 'mini', a local diffusers folder, "
                         "a .safetensors file, or a hub id such as 'runwayml/stable-diffusion-v1-5'")
    else:
        pipe = _load_from_hub_cache(ref, kwargs)
    _check_stable_diffusion(pipe, ref)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_from_hub_cache(repo_id: str, kwargs: dict):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo_id, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise EraseError(f"model {repo_id!r} is not in the local Hugging Face cache and erase does not download: "
                         "download it once where a network is available, or pass a local diffusers folder") from exc


def _load_single_file(path: Path, config: str | Path | None, kwargs: dict):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise EraseError(f"checkpoint {path} does not exist: check the path")
    if path.suffix != ".safetensors":
        raise EraseError(f"{path.name}: only .safetensors checkpoints are loaded (pickled .ckpt files can run "
                         "code); convert it to safetensors first")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise EraseError(f"{path} is not a readable safetensors file ({exc}): the file is corrupt or truncated, "
                         "download or export it again") from exc
    config_dir = Path(config) if config else _shipped_config_for(keys, path)
    if not (config_dir / "model_index.json").is_file():
        raise EraseError(f"config {config_dir} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads((config_dir / "model_index.json").read_text())
    cls = StableDiffusionXLPipeline if index.get("_class_name") == "StableDiffusionXLPipeline" else StableDiffusionPipeline
    extra = {"tokenizer": clip_tokenizer()}
    if cls is StableDiffusionXLPipeline:
        extra["tokenizer_2"] = clip_tokenizer()
    try:
        return cls.from_single_file(str(path), config=str(config_dir), local_files_only=True, **extra, **kwargs)
    except Exception as exc:
        raise EraseError(f"{path.name} could not be loaded as a Stable Diffusion checkpoint ({exc}); "
                         "pass --config with the diffusers folder of its base model") from exc


def _shipped_config_for(keys: list[str], path: Path) -> Path:
    """Pick the shipped config of the SD architecture whose characteristic keys the checkpoint has."""
    keyset = set(keys)
    if any(k.startswith("conditioner.embedders.") for k in keyset):
        raise EraseError(f"{path.name} is an SDXL checkpoint and erase ships no SDXL config yet: pass --config with "
                         "the diffusers folder of its base model")
    if any(k.startswith("cond_stage_model.model.") for k in keyset):
        name = "sd2"  # the 768-v model; an SD2 base (512, epsilon) checkpoint needs --config
    elif "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keyset:
        name = "sd15"
    else:
        raise EraseError(f"{path.name} is not a recognised Stable Diffusion checkpoint (no SD1.x, SD2.x or SDXL "
                         "keys): pass --config with the diffusers folder of its base model")
    return SINGLE_FILE_CONFIGS / name


def _check_stable_diffusion(pipe, ref: str) -> None:
    from diffusers import UNet2DConditionModel

    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel) or getattr(pipe, "text_encoder", None) is None:
        raise EraseError(f"{ref} is not a Stable Diffusion model (erase needs a UNet2DConditionModel with a text "
                         "encoder): pass an SD1.x, SD2.x or SDXL pipeline")
