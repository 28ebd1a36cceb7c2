"""Load erase's single files and LoRAs with ComfyUI's own loaders, from ComfyUI's source, offline.

For each case, erase writes the file with its own exporters (erase.single_file.save_single_file, the families'
save_single_file for SD3 and Flux, erase.lora.save_lora) from a real-architecture pipeline (the shipped configs; Flux
at Flux.1's widths with one block of each kind; random float16 weights: shapes decide ComfyUI's model detection,
random values make a swapped tensor show), then ComfyUI's python loads it in a subprocess, one file at a time:
`comfy.sd.load_checkpoint_guess_config` for a checkpoint, `comfy.sd.load_diffusion_model` for a denoiser-only file,
`comfy.sd.load_lora_for_models` (comfy.lora's key maps and load_lora) for a LoRA on its base. Per file it reports the
model ComfyUI detects, the missing and unexpected keys ComfyUI logs, whether what ComfyUI would save back (its
CheckpointSave mapping) is the file's tensors bit for bit, and for a LoRA how many modules ComfyUI maps and how close
its patched weights come to erase's own application of the LoRA.

    python -m erase_lab.comfy_check --comfyui COMFYUI_SOURCE --comfy-python COMFYUI_VENV/bin/python

(or the environment variables ERASE_COMFYUI and ERASE_COMFY_PYTHON) builds and checks the cases whose rows are
missing or were measured with another ComfyUI (--case: these cases). Files made elsewhere are checked too with
--checkpoint FILE, --diffusion-model FILE and --lora LORA=BASE (BASE loaded as a checkpoint, or as a diffusion model
when ComfyUI finds no checkpoint in it).
Rows land in docs/comfy-check.json and the section "Loads in ComfyUI" of BENCHMARKS.md.

This module's top level imports the standard library only: ComfyUI's python runs its worker half (`--worker`),
without erase installed.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import gc
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

TITLE = "Loads in ComfyUI"
ROWS = Path(__file__).resolve().parent.parent / "docs" / "comfy-check.json"
COMMAND = "python -m erase_lab.comfy_check --comfyui COMFYUI_SOURCE --comfy-python COMFYUI_VENV/bin/python"

# What ComfyUI logs while loading, as `name: regular expression` over the message; the group is a Python literal.
LOGGED = {"unet missing": r"unet missing: (\[.*\])", "unet unexpected": r"unet unexpected: (\[.*\])",
          "vae missing": r"Missing VAE keys (\[.*\])", "vae unexpected": r"Leftover VAE keys (\[.*\])",
          "clip missing": r"clip missing: (\[.*\])", "clip unexpected": r"clip unexpected:? (\[.*\]):?",
          "lora unmapped": r"lora key not loaded: (.*)", "lora not patched": r"NOT LOADED (.*)"}
# ComfyUI warns of missing text-encoder keys except these, which its models hold but never use.
UNUSED_TEXT = (".logit_scale", ".transformer.text_projection.weight")


@dataclass
class Job:
    """One ComfyUI run: a base file (loaded as `loader`), and the LoRAs to load on it with their expected weights."""

    label: str
    path: str
    loader: str = "checkpoint"  # or "diffusion_model"
    loras: list[dict] = field(default_factory=list)  # {"label", "path", "expected": file of patched weights or None}


# ---------------------------------------------------------------------------------------------------- ComfyUI's side


def worker(job_file: str, result_file: str, comfyui: str) -> None:
    """Run in ComfyUI's python: load the job's files with ComfyUI's loaders and write what it found as JSON."""
    job = json.loads(Path(job_file).read_text())
    sys.path.insert(0, comfyui)
    logs: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: logs.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.DEBUG)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # no accelerator needed: loading and key mapping are the same on the CPU
    import comfy.sd
    import torch

    torch.set_num_threads(1)
    half = {"dtype": torch.float16}  # keeps memory at the file's size; float16 → float32 → float16 is exact anyway
    if job["loader"] == "checkpoint":
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(job["path"], model_options=half,
                                                                    te_model_options=half)
    else:
        model, clip, vae = comfy.sd.load_diffusion_model(job["path"], model_options=half), None, None
    result = {"detected": f"{type(model.model.model_config).__name__} ({model.model.model_type.name})",
              **logged(logs), **compare_saved(job["path"], model, clip, vae)}
    result["loras"] = []
    for lora in job["loras"]:
        logs.clear()
        result["loras"].append({"label": lora["label"], **check_lora(lora, model, clip), **logged(logs)})
    Path(result_file).write_text(json.dumps(result))


def logged(logs: list[str]) -> dict[str, list[str]]:
    """The keys in ComfyUI's load messages, by message kind (kinds it did not log are left out)."""
    found: dict[str, list[str]] = {}
    for message in logs:
        for name, pattern in LOGGED.items():
            match = re.fullmatch(pattern, message, re.DOTALL)
            if match:
                keys = ast.literal_eval(match[1]) if match[1].startswith("[") else [match[1]]
                found.setdefault(name, []).extend(keys)
    return found


def compare_saved(path: str, model, clip, vae) -> dict:
    """What ComfyUI would save back from what it loaded (its CheckpointSave mapping) against the file's tensors."""
    import comfy.model_detection
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        if clip is None and vae is None:  # a denoiser-only file: ComfyUI's model keys, under the file's own prefix
            prefix = comfy.model_detection.unet_prefix_from_state_dict(dict.fromkeys(keys))
            if not any(k.startswith(prefix) for k in keys):  # bare names (a BFL Flux file): ComfyUI falls back
                prefix = ""  # to "model." and then strips nothing
            saved = {prefix + k: v for k, v in model.model.diffusion_model.state_dict().items()}
        else:
            saved = model.model.state_dict_for_saving(clip.get_sd() if clip else None, vae.get_sd() if vae else None)
        common = [k for k in keys if k in saved]
        different = []
        for key in common:
            tensor = f.get_tensor(key)
            if not torch.equal(saved[key].to(tensor.dtype), tensor):
                different.append(key)
    return {"tensors": len(keys), "compared": len(common), "different": different,
            "dropped": [k for k in keys if k not in saved], "added": [k for k in saved if k not in set(keys)]}


def check_lora(lora: dict, model, clip) -> dict:
    """Load the LoRA as ComfyUI's LoraLoader does, at strength 1, and compare the weights it patches with erase's."""

    import comfy.sd
    import comfy.utils

    tensors = comfy.utils.load_torch_file(lora["path"])
    patched_model, _ = comfy.sd.load_lora_for_models(model, clip, tensors, 1.0, 1.0)
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}
    out = {"modules": len(modules), "patched": len(patched_model.patches)}
    if lora.get("expected"):
        expected = comfy.utils.load_torch_file(lora["expected"])
        worst = 0.0
        for name, tensor in expected.items():  # the base file's names → ComfyUI's model keys
            key = "diffusion_model." + name.split("diffusion_model.", 1)[-1]
            patched_model.patch_weight_to_device(key)
            weight = comfy.utils.get_attr(patched_model.model, key)
            scale = float(tensor.float().abs().max()) or 1.0
            worst = max(worst, float((weight.float() - tensor.float()).abs().max()) / scale)
        patched_model.unpatch_model()
        out.update(expected=len(expected), worst=worst)
    return out


# ------------------------------------------------------------------------------------------------------- erase's side


def random_pipeline(name: str, seed: int = 0, text_layers: int | None = None):
    """The pipeline of a shipped config (erase/model_configs/NAME) with random float16 weights, built on the meta
    device and filled one tensor at a time (SDXL: 7 GB, never twice); float buffers (SD3's position table) in float16
    too, as released files hold them. T5 stays out: SD3 runs without it. `text_layers`: an OpenCLIP tower of another
    depth (SD2's 24 layers, as released files hold them)."""
    import diffusers
    import torch
    import transformers
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig

    import erase
    from erase_lab.tiny import MODEL_CONFIGS

    folder = MODEL_CONFIGS / name
    index = json.loads((folder / "model_index.json").read_text())
    denoiser = "transformer" if "transformer" in index else "unet"
    parts = {}
    with init_empty_weights():
        for part in (denoiser, "vae"):
            cls = getattr(diffusers, index[part][1])
            parts[part] = cls.from_config(cls.load_config(folder / part))
        for part in ("text_encoder", "text_encoder_2"):
            if part in index:
                config = CLIPTextConfig.from_pretrained(folder / part)
                if text_layers and part == "text_encoder":
                    config.num_hidden_layers = text_layers
                parts[part] = getattr(transformers, index[part][1])(config)
                parts[part.replace("text_encoder", "tokenizer")] = erase.clip_tokenizer()
    generator = torch.Generator().manual_seed(seed)
    for model in (parts[p] for p in (denoiser, "vae", "text_encoder", "text_encoder_2") if p in parts):
        for module in model.modules():
            for key, param in module._parameters.items():
                if param is not None:
                    module._parameters[key] = torch.nn.Parameter(
                        torch.randn(param.shape, generator=generator, dtype=torch.float16), requires_grad=False)
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.is_floating_point():
                    module._buffers[key] = buffer.half()
    scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(folder / "scheduler")
    pipeline = getattr(diffusers, index["_class_name"])
    extra = {} if "text_encoder_2" in index else {"safety_checker": None, "feature_extractor": None,
                                                  "requires_safety_checker": False}
    if "text_encoder_3" in index:
        extra.update(text_encoder_3=None, tokenizer_3=None)
    return pipeline(**parts, scheduler=scheduler, **extra)


def small_edit(denoiser, seed: int = 0, columns: dict[str, slice] | None = None):
    """A rank-2 random change of the first and last layer of every kind of Linear and Conv2d weight in the denoiser
    (UNet: attention, feed-forward, projections, resnet convolutions, time and size embeddings, in and out): every
    module name shape a LoRA of an erase edit can have. `columns`: weights changed only in these input columns."""
    import torch
    from torch import nn

    from erase.edits import MaskEdit

    kinds: dict[str, list[str]] = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            kinds.setdefault(re.sub(r"\d+", "#", name), []).append(name)
    names = {f"{n}.weight" for group in kinds.values() for n in (group[0], group[-1])}
    generator = torch.Generator().manual_seed(seed)
    params = dict(denoiser.named_parameters())
    new = {}
    for name in sorted(names):
        weight = params[name]
        low = torch.randn(weight.shape[0], 2, generator=generator) @ torch.randn(2, weight[0].numel(),
                                                                                 generator=generator)
        if columns and name in columns:
            kept = torch.zeros(weight[0].numel())
            kept[columns[name]] = 1
            low *= kept
        new[name] = weight + (0.05 * low).reshape(weight.shape).to(weight.dtype)
    return MaskEdit.from_weights(new, {name: params[name] for name in new})


def write_lora(denoiser, edit, folder: Path, label: str, file_weights) -> dict:
    """erase's LoRA (rank 4) of `edit` on `denoiser`, and beside it the weights erase's own application of that LoRA
    gives, under the base file's names (`file_weights(denoiser, edited weight names)`): what ComfyUI's patched
    weights are compared with."""
    from safetensors.torch import save_file

    from erase.lora import save_lora, to_lora

    lora = to_lora(denoiser, edit, 4)
    path, expected = folder / f"{label}.safetensors", folder / f"{label}.expected.safetensors"
    save_lora(path, lora, {"method": "comfy-check"})
    with lora.edit(denoiser).applied_to(denoiser):
        weights = file_weights(denoiser, set(lora.modules))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(expected))
    return {"label": label, "path": str(path), "expected": str(expected)}


def unet_file_weights(unet, names: set[str]) -> dict:
    """These UNet weights (copies) under a checkpoint's names."""
    from erase.single_file import UNET_PREFIX, rename, unet_block_prefixes

    params = dict(unet.named_parameters())
    weights = {name: params[name].detach().clone() for name in names}
    return {UNET_PREFIX + k: v for k, v in rename(weights, unet_block_prefixes(unet.config)).items()}


def flux_file_weights(transformer, names: set[str]) -> dict:
    """The BFL-layout tensors (copies) that hold any of these Flux transformer weights: a fused qkv or linear1 whole."""
    from erase.families.flux_file import bfl_layout, transformer_state

    state = transformer_state(transformer)
    return {key: state[key].detach().clone() for key, held in bfl_layout(transformer.config).items()
            if names & set(held)}


def build_sd(folder: Path, name: str, label: str) -> list[Job]:
    """A checkpoint of the shipped `name` config (as from a diffusers-folder base) and a LoRA on it."""
    from erase.single_file import save_single_file

    pipe = random_pipeline(name)
    path = folder / f"{label}.safetensors"
    save_single_file(pipe, path, {"method": "comfy-check"})
    lora = write_lora(pipe.unet, small_edit(pipe.unet), folder, f"{label}-lora", unet_file_weights)
    return [Job(label, str(path), loras=[lora])]


def build_sd2_released(folder: Path) -> list[Job]:
    """SD2.1 as released (OpenCLIP's 24 text layers) loaded by erase without --model-config, then exported."""
    import erase
    from erase.single_file import save_single_file

    base = folder / "sd2-released-base.safetensors"
    save_single_file(random_pipeline("sd2", seed=1, text_layers=24), base, {"method": "none"})
    gc.collect()
    pipe = erase.load_pipeline(base)
    path = folder / "sd2-from-single-file.safetensors"
    save_single_file(pipe, path, {"method": "comfy-check"}, half=True)
    return [Job("sd2-from-single-file", str(path))]


def build_sdxl_reloaded(folder: Path) -> list[Job]:
    """An SDXL file loaded by erase without --model-config (the shipped SDXL base config; bfloat16 keeps the memory
    at one copy), then exported again."""
    import erase
    from erase.single_file import save_single_file

    base = folder / "sdxl-base.safetensors"
    save_single_file(random_pipeline("sdxl", seed=1), base, {"method": "none"})
    gc.collect()
    pipe = erase.load_pipeline(base, dtype="bfloat16")
    base.unlink()
    path = folder / "sdxl-from-single-file.safetensors"
    save_single_file(pipe, path, {"method": "comfy-check"}, half=True)
    return [Job("sdxl-from-single-file", str(path))]


def build_sd3(folder: Path) -> list[Job]:
    """SD3 medium's whole checkpoint: transformer, VAE, CLIP-L and CLIP-G (no T5, as SD3 runs and ships without)."""
    from erase.families.sd3_file import save_single_file

    path = folder / "sd3-medium.safetensors"
    save_single_file(random_pipeline("sd3-medium"), path, {"method": "comfy-check"})
    return [Job("sd3-medium", str(path))]


def write_flux(transformer, folder: Path, label: str) -> Job:
    """The transformer's BFL file, for ComfyUI's Load Diffusion Model."""
    from types import SimpleNamespace

    from erase.families.flux_file import save_single_file

    path = folder / f"{label}.safetensors"
    save_single_file(SimpleNamespace(transformer=transformer), path, {"method": "comfy-check"})
    return Job(label, str(path), "diffusion_model")


def build_flux(folder: Path) -> list[Job]:
    """Flux.1 dev (guidance embedding) and schnell (none) at Flux.1's width with one block of each kind, and a LoRA
    on dev whose edit also changes only the MLP columns of the single block's proj_out (an MLP neuron's outputs)."""
    from erase_lab.tiny import flux_at_reader_width

    dev = flux_at_reader_width(guidance=True)
    mlp = slice(dev.config.num_attention_heads * dev.config.attention_head_dim, None)  # after the attention's columns
    edit = small_edit(dev, columns={"single_transformer_blocks.0.proj_out.weight": mlp})
    jobs = [write_flux(dev, folder, "flux-dev-1+1")]
    jobs[0].loras.append(write_lora(dev, edit, folder, "flux-dev-1+1-lora", flux_file_weights))
    del dev, edit
    return [*jobs, write_flux(flux_at_reader_width(guidance=False), folder, "flux-schnell-1+1")]


@dataclass(frozen=True)
class Case:
    """How to build a case's files, and the rows it measures (a case whose rows are all current is not rebuilt)."""

    build: object  # folder → list[Job]
    rows: tuple[str, ...]


CASES = {
    "sd15": Case(lambda folder: build_sd(folder, "sd15", "sd15"), ("sd15", "sd15-lora")),
    "sd2": Case(lambda folder: build_sd(folder, "sd2", "sd2-from-folder"), ("sd2-from-folder", "sd2-from-folder-lora")),
    "sd2-released": Case(build_sd2_released, ("sd2-from-single-file",)),
    "sdxl": Case(lambda folder: build_sd(folder, "sdxl", "sdxl"), ("sdxl", "sdxl-lora")),
    "sdxl-released": Case(build_sdxl_reloaded, ("sdxl-from-single-file",)),
    "sd3-medium": Case(build_sd3, ("sd3-medium",)),
    "flux": Case(build_flux, ("flux-dev-1+1", "flux-dev-1+1-lora", "flux-schnell-1+1")),
}
WHAT = {"sd15": "SD1.5 checkpoint (from a diffusers-folder base) and a LoRA on it",
        "sd2-from-folder": "SD2.1 checkpoint from a diffusers-folder base (23 text layers) and a LoRA on it",
        "sd2-from-single-file": "SD2.1 checkpoint from a released-layout single file (24 text layers), loaded by "
                                "erase without --model-config",
        "sdxl": "SDXL base checkpoint (from a diffusers-folder base) and a LoRA on it",
        "sdxl-from-single-file": "SDXL checkpoint from a single file loaded by erase without --model-config "
                                 "(bfloat16)",
        "sd3-medium": "SD3 medium checkpoint (transformer, VAE, CLIP-L, CLIP-G; no T5) in the SAI/ComfyUI layout "
                      "(erase.families.sd3_file)",
        "flux-dev-1+1": "Flux.1-dev transformer with one double and one single block, in Black Forest Labs' "
                        "layout, and a LoRA on it",
        "flux-schnell-1+1": "likewise Flux.1-schnell (no guidance embedding), without a LoRA"}


def run_job(job: Job, comfyui: Path, python: str) -> dict:
    """Run ComfyUI's loaders on `job` in ComfyUI's python; its result, or the error it ended with."""
    with tempfile.TemporaryDirectory() as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job.__dict__))
        done = subprocess.run([python, __file__, "--worker", str(job_file), str(result_file), str(comfyui)],
                              cwd=comfyui, capture_output=True, text=True, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode or not result_file.is_file():
            return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        return json.loads(result_file.read_text())


def comfy_commit(comfyui: Path, commit: str | None) -> str:
    """The ComfyUI version the source folder holds, and its commit (`commit`, or the clone's own)."""
    version = re.search(r"__version__\s*=\s*\"([^\"]+)\"", (comfyui / "comfyui_version.py").read_text())
    if not commit:
        done = subprocess.run(["git", "-C", str(comfyui), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=False)
        commit = done.stdout.strip() if done.returncode == 0 else ""
    return f"ComfyUI {version[1] if version else '?'}" + (f" (commit {commit[:12]})" if commit else "")


def rows_of(job: Job, result: dict) -> list[dict]:
    """Table rows of a job: the base file, then each LoRA."""
    if "error" in result:
        return [{"file": job.label, "loader": job.loader, "error": result["error"]}]
    text_missing = [k for k in result.get("clip missing", []) if not k.endswith(UNUSED_TEXT)]
    rows = [{"file": job.label, "loader": job.loader, "detected": result["detected"],
             "denoiser missing": result.get("unet missing", []), "denoiser unexpected": result.get("unet unexpected", []),
             "vae missing": result.get("vae missing", []), "text missing": text_missing,
             "tensors": result["tensors"], "compared": result["compared"], "different": result["different"],
             "dropped": result["dropped"], "added": result["added"]}]
    for lora in result["loras"]:
        rows.append({"file": lora["label"], "loader": "lora", "base": job.label, "modules": lora["modules"],
                     "unmapped": lora.get("lora unmapped", []), "not patched": lora.get("lora not patched", []),
                     "patched": lora["patched"], "worst": lora.get("worst")})
    return rows


def keys_cell(keys: list[str]) -> str:
    """A count of keys, with the first one (shortened) to say which."""
    if not keys:
        return "0"
    first = keys[0] if len(keys[0]) <= 48 else "…" + keys[0][-47:]
    return f"{len(keys)} (`{first}`{', …' if len(keys) > 1 else ''})"


def checkpoint_line(row: dict, mark: str) -> str:
    if "error" in row:
        return f"| {row['file']}{mark} | {row['loader']} | fails: {row['error']} | | | | | |"
    identical = f"{row['compared'] - len(row['different'])} / {row['compared']}"
    return (f"| {row['file']}{mark} | {row['loader']} | {row['detected']} | {keys_cell(row['denoiser missing'])} · "
            f"{keys_cell(row['denoiser unexpected'])} | {keys_cell(row['vae missing'])} | "
            f"{keys_cell(row['text missing'])} | {identical} | {keys_cell(row['dropped'])} |")


def lora_line(row: dict, mark: str) -> str:
    mapped = row["modules"] - len({k.rsplit(".", 2)[0] for k in row["unmapped"]})
    worst = "" if row["worst"] is None else f"{row['worst']:.1e}"
    return (f"| {row['file']}{mark} | {row['base']} | {mapped} / {row['modules']} | {keys_cell(row['unmapped'])} | "
            f"{row['patched']} | {worst} |")


def section(store, comfy: str) -> str:
    from erase_lab.benchmarks_md import section_body

    checkpoints = [r for r in store.rows if r["loader"] != "lora"]
    loras = [r for r in store.rows if r["loader"] == "lora"]
    files = "\n".join([("| file | ComfyUI loader | detected (prediction) | denoiser missing · unexpected | VAE missing "
                        "| text encoder missing (warned) | tensors identical | erase's tensors ComfyUI drops |"),
                       "| --- | --- | --- | --- | --- | --- | --- | --- |",
                       *(checkpoint_line(r, store.mark(r)) for r in checkpoints)])
    lora_table = "\n".join([("| LoRA | base | modules mapped | keys not loaded | weights patched | "
                             "max \\|ComfyUI − erase\\| / max \\|W\\| |"),
                            "| --- | --- | --- | --- | --- | --- |", *(lora_line(r, store.mark(r)) for r in loras)])
    stale = [r for r in store.rows if not store.current(r)]
    status = [(f"_{len(stale)} rows (†) were measured with another ComfyUI than {comfy}; `{COMMAND}` measures "
               "them again._")] if stale else []
    what = "; ".join(f"{label}: {about}" for label, about in WHAT.items())
    protocol = (f"ComfyUI: {comfy}, its source run offline on the CPU (its own python, with torch, einops, "
                "safetensors, transformers, tokenizers, torchsde, scipy, pyyaml, psutil, Pillow, tqdm, sentencepiece). "
                "Files: " + what + ". Each is written by erase's exporters (erase.single_file.save_single_file; "
                "erase.families.sd3_file's and erase.families.flux_file's save_single_file for SD3 and Flux; "
                "erase.lora.save_lora) with random float16 weights (shapes decide ComfyUI's model detection; random "
                "values make a swapped tensor show): the UNets and SD3 medium (24 joint blocks, 1536 wide, its "
                "position table in float16 too) at the real architecture of erase's shipped configs; the Flux files "
                "at Flux.1's widths, which ComfyUI's detection and its split of the fused tensors assume (3072 "
                "hidden as 24 heads of 128, 4096 text, 768 pooled, 64 latent channels in), with one double and one "
                "single block (546M parameters; each row of each tensor one seeded random value, so a moved row "
                "shows). The UNet LoRAs (kohya names) hold a rank-2 change of the first and last layer of every kind "
                "of Linear and Conv2d weight; the Flux LoRA (diffusers names, transformer.<module>.lora_A/B) one of "
                "every Linear weight of the transformer, the single block's proj_out changed in its MLP columns "
                "only; all at rank 4. ComfyUI loads one file at a time: comfy.sd.load_checkpoint_guess_config "
                "(weights in float16; comfy.sd.load_diffusion_model for a denoiser-only file), then "
                "comfy.sd.load_lora_for_models at strength 1 for each LoRA on its base. Missing and unexpected keys "
                "are the ones ComfyUI logs; the text encoder's are those it warns of (it leaves logit_scale and "
                "CLIP-L's text_projection unwarned, as its models never use them). Tensors identical: what "
                "ComfyUI's CheckpointSave would write back from what it loaded (for a denoiser-only file, its "
                "diffusion model's tensors under the file's names), against the file, bit for bit. LoRA: modules "
                "whose keys ComfyUI's key maps (comfy.lora.model_lora_keys_unet / model_lora_keys_clip) place, the "
                "weights it patches (ComfyUI's Flux holds a double block's q, k and v as one weight, and a single "
                "block's q, k, v and MLP input as one), and the largest difference between its patched weights and "
                "erase's own application of the LoRA (Lora.edit, written in the base file's layout), relative to "
                "the weight's largest entry: rounding only, as ComfyUI adds the product in float32 and erase in the "
                "weight's dtype.")
    return section_body([files, lora_table], protocol, f"`{COMMAND}`", status)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m erase_lab.comfy_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("ERASE_COMFYUI"),
                        help="ComfyUI's source folder (env ERASE_COMFYUI)")
    parser.add_argument("--comfyui-commit", default=os.environ.get("ERASE_COMFYUI_COMMIT"),
                        help="the commit the source folder was exported from, when it is not a git clone")
    parser.add_argument("--comfy-python", default=os.environ.get("ERASE_COMFY_PYTHON"),
                        help="a python with ComfyUI's dependencies (env ERASE_COMFY_PYTHON)")
    parser.add_argument("--case", action="append", choices=sorted(CASES),
                        help="build and check these cases (default: those with rows missing or measured with another "
                             "ComfyUI, unless files are given)")
    parser.add_argument("--checkpoint", action="append", default=[], help="check this checkpoint file too")
    parser.add_argument("--diffusion-model", action="append", default=[], help="check this denoiser-only file too")
    parser.add_argument("--lora", action="append", default=[], metavar="LORA=BASE",
                        help="check this LoRA on BASE (a checkpoint or a denoiser-only file)")
    parser.add_argument("--work", type=Path, help="where the files are written (default: a temporary folder)")
    parser.add_argument("--print-only", action="store_true", help="print the section, leave BENCHMARKS.md as it is")
    args = parser.parse_args(argv)
    if not args.comfyui or not (args.comfyui / "comfy" / "sd.py").is_file():
        parser.error("--comfyui: pass ComfyUI's source folder (the one holding comfy/sd.py)")
    if not args.comfy_python:
        parser.error("--comfy-python: pass a python with ComfyUI's dependencies")
    return args


def given_jobs(args) -> list[Job]:
    """Jobs for files made elsewhere: checkpoints, denoiser-only files, LoRAs on a base."""
    jobs = [Job(Path(p).name, str(Path(p).resolve())) for p in args.checkpoint]
    jobs += [Job(Path(p).name, str(Path(p).resolve()), "diffusion_model") for p in args.diffusion_model]
    for spec in args.lora:
        lora, _, base = spec.partition("=")
        if not base:
            raise SystemExit(f"--lora {spec}: pass LORA=BASE, the LoRA file and the file of the model it applies to")
        jobs.append(Job(Path(base).name, str(Path(base).resolve()),
                        loras=[{"label": Path(lora).name, "path": str(Path(lora).resolve()), "expected": None}]))
    return jobs


def release_memory() -> None:
    """Free the pipeline that wrote the files and hand its memory back to the system before ComfyUI loads them in
    its own process (glibc keeps the pages of freed small tensors: 2 GB after SD3 medium)."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from erase_lab.benchmarks_md import RowStore, update_section

    torch.set_num_threads(1)
    comfy = comfy_commit(args.comfyui, args.comfyui_commit)
    store = RowStore(None if args.print_only else ROWS, ("file",), comfy)
    missing = [name for name, case in CASES.items() if not all(store.has(file=row) for row in case.rows)]
    cases = args.case or ([] if args.checkpoint or args.diffusion_model or args.lora else missing)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.work or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for build in [*(CASES[name].build for name in cases), lambda _: given_jobs(args)]:
            jobs = build(folder)
            release_memory()
            for job in jobs:
                for row in rows_of(job, run_job(job, args.comfyui, args.comfy_python)):
                    store.put(row)
                    print(json.dumps(row)[:300], flush=True)
                if not args.print_only:  # each file's rows as they land: a stopped run keeps what it measured
                    update_section(TITLE, section(store, comfy))
                if args.work is None and job.label in WHAT:
                    for path in [job.path, *(p for lora in job.loras for p in (lora["path"], lora["expected"]))]:
                        Path(path).unlink(missing_ok=True)
    if not args.print_only:  # also when nothing was missing: the section follows the rows and this module's text
        update_section(TITLE, section(store, comfy))
    print(section(store, comfy))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:5])
    else:
        main()
