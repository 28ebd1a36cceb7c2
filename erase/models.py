"""Model loading: the shipped miniature pipeline, hub ids, local diffusers folders and single-file checkpoints.

Nothing here reaches for the network unless the user's environment allows it: hub ids are resolved from the
local cache first, and single-file checkpoints are configured from the configs shipped with the package.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import EraseError
from .profile import EMBEDDED, MINI_PIPELINE_DIR, profile_of
from .single_file import SD1_TEXT, SD2_TEXT, SDXL_TEXT, SDXL_TEXT_2, carried_tensors

MINI_DIR = MINI_PIPELINE_DIR.parent
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
    """The generated image's side in pixels: `resolution`, or the model's default. A side the VAE (or a transformer's
    patches) cannot decode, or one whose image cannot fit in the device's memory (the killer would end the run), is
    refused."""
    from .families import family_of

    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    default, multiple = family.default_side(pipe), family.side_multiple(pipe)
    side = resolution or default
    if side % multiple:
        raise EraseError(f"resolution={side} is not a multiple of {multiple}, what the model's latents come in: pass a "
                         f"multiple, e.g. resolution={default}")
    # A lower bound: one activation of the denoiser's first block, for one image without guidance.
    need = family.activation_bytes(denoiser, side // pipe.vae_scale_factor)
    memory = device_memory(denoiser.device)
    if need > memory:
        raise EraseError(f"resolution={side} needs more than {need / 2**30:.0f} GB for one image and the "
                         f"{denoiser.device.type} has {memory / 2**30:.0f} GB: lower it (the model's default is {default})")
    return side


def device_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float("inf")  # mps: shares the system memory, which torch does not report


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise EraseError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def check_device(device: str, dtype: torch.dtype | None) -> None:
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise EraseError(f"unknown device {device!r}: pass cpu, cuda, cuda:1 or mps") from None
    if kind not in ("cpu", "cuda", "mps"):
        raise EraseError(f"device {device!r} cannot run a model: pass cpu, cuda, cuda:1 or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise EraseError(f"device {device!r} is not available on this machine: pass --device cpu")
    if kind == "cuda" and torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
        raise EraseError(f"device {device!r} is not available: this machine has {torch.cuda.device_count()} GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise EraseError("device 'mps' is not available on this machine: pass --device cpu")
    if kind == "cpu" and dtype == torch.float16:
        raise EraseError("float16 is not supported for inference on the CPU: pass --dtype float32 or bfloat16")


PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def check_model(model: str | Path, config: str | Path | None = None) -> str:
    """What `model` names ('mini' for a model erase ships, 'file', 'folder' or 'hub'), after refusing, from the
    paths alone and without importing diffusers, a model that cannot be loaded."""
    ref = str(model)
    path = Path(ref).expanduser()
    if ref in EMBEDDED:
        if not (EMBEDDED[ref] / "model_index.json").is_file():
            raise EraseError(f"the miniature model {ref!r} is not installed at {EMBEDDED[ref]}: reinstall erase, or "
                             "build it from a checkout as docs/mini-world.md says")
        return "mini"
    if path.suffix in (".safetensors", *PICKLES) or path.is_file():
        if not path.is_file():
            raise EraseError(f"checkpoint {path} does not exist: check the path")
        if path.suffix != ".safetensors":
            raise EraseError(f"{path.name}: only .safetensors checkpoints are loaded (pickled .ckpt files can run "
                             "code); convert it to safetensors first")
        if config is not None:
            _pipeline_index(Path(config).expanduser(), "--model-config")
        return "file"
    if path.is_dir():
        _check_pipeline_folder(path)
        return "folder"
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise EraseError(f"model {ref!r} does not exist: pass 'mini', a local diffusers folder, "
                         "a .safetensors file, or a hub id such as 'runwayml/stable-diffusion-v1-5'")
    return "hub"


def _pipeline_index(folder: Path, option: str) -> dict:
    """model_index.json of a diffusers pipeline folder."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise EraseError(f"{option} {folder} is not a diffusers pipeline folder (no model_index.json): pass a Stable "
                         "Diffusion folder saved with save_pretrained" + (", or a .safetensors file" if option == "--model" else ""))
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EraseError(f"{index} is not valid JSON ({exc}): save the pipeline again with save_pretrained") from None
    if not isinstance(data, dict):
        raise EraseError(f"{index} is not a JSON object: save the pipeline again with save_pretrained")
    return data


def _check_pipeline_folder(folder: Path) -> None:
    """Every component model_index.json names is there, and every model among them has safetensors weights."""
    for name, spec in _pipeline_index(folder, "--model").items():
        if name.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
            continue
        component = folder / name
        if not component.is_dir():
            raise EraseError(f"{folder} lacks the {name}/ folder that its model_index.json lists: save the whole "
                             "pipeline with save_pretrained, or copy the missing folder in")
        if not (component / "config.json").is_file():
            continue  # a scheduler or tokenizer: configuration only
        suffixes = {f.suffix for f in component.iterdir()}
        if ".safetensors" not in suffixes and suffixes & set(PICKLES):
            raise EraseError(f"{component} holds its weights only as a pickle ({', '.join(sorted(suffixes & set(PICKLES)))}), "
                             "which erase does not load because unpickling can run code: convert it with "
                             "save_pretrained(..., safe_serialization=True)")
        if ".safetensors" not in suffixes:
            raise EraseError(f"{component} has no weights (no .safetensors file): save the whole pipeline with "
                             "save_pretrained, or copy its weights in")


def load_pipeline(model: str | Path = "mini", device: str = "cpu", dtype: str | torch.dtype | None = None,
                  config: str | Path | None = None):
    """Load a Stable Diffusion pipeline.

    model: "mini" or "mini-dit" (the miniature world's Stable Diffusion and SD3, shipped with erase), a hub id
    available in the local cache, a local diffusers folder, or a single-file ``.safetensors`` checkpoint
    (configured from ``config``, a local diffusers folder, or from the configs shipped with erase when the
    architecture is recognised).
    """
    torch_dtype = resolve_dtype(dtype)
    check_device(device, torch_dtype)
    source = check_model(model, config)  # before diffusers is imported: a bad path is refused at once
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    ref = str(model)
    if source == "hub":
        pipe = _load_from_hub_cache(ref, kwargs)
    elif source == "file":
        pipe = _load_single_file(Path(ref).expanduser(), config, kwargs)
    else:
        folder = EMBEDDED[ref] if source == "mini" else Path(ref).expanduser()
        try:
            pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, **absent_components(folder), **kwargs)
        except (OSError, ValueError, TypeError) as exc:
            raise EraseError(f"{folder} could not be loaded as a diffusers pipeline ({exc}): save it again with "
                             "save_pretrained") from exc
    check_pipeline(pipe, ref)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def absent_components(folder: Path) -> dict[str, None]:
    """The components model_index.json marks null (an SD3 folder saved without T5, as users keep it to save memory):
    passed as None, which diffusers accepts, where it would otherwise refuse the folder as incomplete."""
    return {name: None for name, spec in _pipeline_index(folder, "--model").items()
            if not name.startswith("_") and isinstance(spec, list) and spec and spec[0] is None}


def _load_from_hub_cache(repo_id: str, kwargs: dict):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo_id, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise EraseError(f"model {repo_id!r} is not in the local Hugging Face cache and erase does not download: "
                         "download it once where a network is available, or pass a local diffusers folder") from exc


def _load_single_file(path: Path, config: str | Path | None, kwargs: dict):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise EraseError(f"{path} is not a readable safetensors file ({exc}): the file is corrupt or truncated, "
                         "download or export it again") from exc
    dit = _load_transformer_file(path, keys, config and Path(config).expanduser(), kwargs)
    if dit is not None:
        pipe = dit
    else:
        pipe = _load_sd_file(path, keys, config, kwargs)
    pipe.register_to_config(_name_or_path=str(path))
    pipe.source_sha256 = file_sha256(path)
    return pipe


def _load_transformer_file(path: Path, keys: list[str], config: Path | None, kwargs: dict):
    """An SD3/SD3.5 checkpoint (SAI's layout) or a Flux.1 transformer file (BFL's), or None for another file. A Flux
    file holds the transformer alone: the text encoders and the VAE come from --model-config, the base model's folder."""
    from diffusers import DiffusionPipeline

    from .families import flux_file, sd3_file

    dtype = kwargs.get("torch_dtype")
    if any(k.startswith(sd3_file.MODEL_PREFIX + "joint_blocks.") for k in keys):
        config_dir = config or sd3_file.config_for(keys)
        if config_dir is None:
            raise EraseError(f"{path.name} is an SD3 checkpoint of no architecture erase ships a config for (SD3 medium, "
                             "SD3.5 medium or large): pass --model-config with the diffusers folder of its base model")
        try:
            return sd3_file.load_single_file(path, config_dir, dtype)
        except EraseError:
            raise
        except Exception as exc:
            raise EraseError(f"{path.name} could not be loaded as an SD3 checkpoint ({exc}); pass --model-config with "
                             "the diffusers folder of its base model") from exc
    if flux_file.config_for(keys) is None:
        return None
    if config is None:
        raise EraseError(f"{path.name} is a Flux.1 transformer file, which holds no text encoders or VAE: pass "
                         "--model-config with the diffusers folder of its base model (FLUX.1-dev or FLUX.1-schnell)")
    transformer = flux_file.load_transformer(path, config, dtype)
    try:
        return DiffusionPipeline.from_pretrained(config, transformer=transformer, use_safetensors=True,
                                                 local_files_only=True, **absent_components(config), **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise EraseError(f"--model-config {config} could not give {path.name} its text encoders and VAE ({exc}): pass "
                         "the diffusers folder of its base model, with their weights") from exc


def _load_sd_file(path: Path, keys: list[str], config: str | Path | None, kwargs: dict):
    """A Stable Diffusion 1.x, 2.x or XL checkpoint in the original layout."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    config_dir = Path(config).expanduser() if config else _shipped_config_for(keys, path)
    index = _pipeline_index(config_dir, "--model-config")
    cls = StableDiffusionXLPipeline if index.get("_class_name") == "StableDiffusionXLPipeline" else StableDiffusionPipeline
    extra = {"tokenizer": clip_tokenizer(_text_length(config_dir / "text_encoder"))}
    if cls is StableDiffusionXLPipeline:
        extra["tokenizer_2"] = clip_tokenizer(_text_length(config_dir / "text_encoder_2"))
    try:
        extra.update(_clip_text_encoder(path, keys, config_dir, kwargs.get("torch_dtype")))
        pipe = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True, **extra, **kwargs)
    except Exception as exc:
        raise EraseError(f"{path.name} could not be loaded as a Stable Diffusion checkpoint ({exc}); "
                         "pass --model-config with the diffusers folder of its base model") from exc
    pipe.carried_tensors = carried_tensors(path, keys, pipe)  # SD2.x's 24th text layer, for the single-file export
    return pipe


def clip_text_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The CLIP text encoder's tensors under `prefix` in the layout diffusers reads (`text_model.` restored)."""
    return {prefix + "text_model." + k[len(prefix):].removeprefix("text_model."): v
            for k, v in tensors.items() if k.startswith(prefix)}


def _clip_text_encoder(path: Path, keys: list[str], config_dir: Path, dtype) -> dict:
    """{"text_encoder": the OpenAI CLIP text encoder (SD1.x; SDXL's first) of either layout}, built by diffusers' own
    converter from the normalised tensors; {} when the file has none (SD2.x).

    Under its prefix, A1111's and released checkpoints write `text_model.embeddings.*`; diffusers' own converters
    under transformers 5 (flattened CLIPTextModel) write `embeddings.*`. diffusers' loader recognises only the first.
    """
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors import safe_open
    from transformers import CLIPTextModel

    prefix = next((p for p in (SD1_TEXT, SDXL_TEXT) if any(k.startswith(p) for k in keys)), None)
    if prefix is None:
        return {}
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    return {"text_encoder": create_diffusers_clip_model_from_ldm(
        CLIPTextModel, clip_text_state(tensors, prefix), subfolder="text_encoder", config=str(config_dir),
        torch_dtype=dtype, local_files_only=True)}


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, as given (not of the tensors): what `sha256sum` prints, with a `sha256:` prefix."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def model_record(pipe) -> dict:
    """erase.json's `model`: source (path or hub id; a model with a name of its own, such as the miniature model,
    by that name and version; a single file's sha256 too), pipeline, dtype, device."""
    profile = profile_of(pipe)
    source = profile.name or str(getattr(pipe, "name_or_path", "") or "in-memory pipeline")
    record = {"source": source, **({"version": profile.version} if profile.version else {})}
    if getattr(pipe, "source_sha256", None):
        record["sha256"] = pipe.source_sha256
    from .families import family_of

    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    return {**record, "pipeline": type(pipe).__name__, "family": family.name, "denoiser": type(denoiser).__name__,
            "dtype": str(denoiser.dtype), "device": str(denoiser.device)}


def _text_length(text_encoder: Path) -> int:
    """The prompt length (tokens) the text encoder's position embeddings allow: the tokenizer must not exceed it."""
    try:
        return int(json.loads((text_encoder / "config.json").read_text()).get("max_position_embeddings", 77))
    except (OSError, ValueError):
        return 77  # no readable config: diffusers refuses the folder with its own message


def _shipped_config_for(keys: list[str], path: Path) -> Path:
    """Pick the shipped config of the SD architecture whose characteristic keys the checkpoint has."""
    keyset = set(keys)
    if any(k.startswith(SDXL_TEXT_2) for k in keyset):
        name = "sdxl"  # SDXL base 1.0 and its fine-tunes: CLIP-L and OpenCLIP bigG
    elif any(k.startswith("conditioner.embedders.") for k in keyset):
        raise EraseError(f"{path.name} is an SDXL checkpoint without SDXL base's two text encoders (a refiner?), which "
                         "erase ships no config for: pass --model-config with the diffusers folder of its base model")
    elif any(k.startswith(SD2_TEXT) for k in keyset):
        name = "sd2"  # the 768-v model; an SD2 base (512, epsilon) checkpoint needs --model-config
    elif {f"{SD1_TEXT}{inner}embeddings.token_embedding.weight" for inner in ("text_model.", "")} & keyset:
        name = "sd15"
    else:
        raise EraseError(f"{path.name} is not a recognised Stable Diffusion checkpoint (no SD1.x, SD2.x or SDXL "
                         "keys): pass --model-config with the diffusers folder of its base model")
    return SINGLE_FILE_CONFIGS / name


def check_pipeline(pipe, what: str) -> None:
    """Refuse anything but a pipeline of a model family erase knows (erase.families): a Stable Diffusion UNet,
    SD3/SD3.5, Flux.1 or a diffusers text-to-image transformer built from FeedForward blocks."""
    from .families import family_of

    try:
        family_of(pipe)
    except EraseError:
        raise EraseError(f"{what} is not a model erase can edit (a Stable Diffusion UNet with a text encoder, "
                         "SD3/SD3.5, Flux.1, or a diffusers text-to-image transformer built from FeedForward blocks): "
                         "pass such a diffusers pipeline, e.g. from erase.load_pipeline") from None
