"""The model card of a run folder: README.md, which the Hugging Face Hub shows for an uploaded folder.

It is written from the folder's erase.json and, once the run is evaluated, its report/report.json, so it always
describes what the folder holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .evaluation.report import summary_table
from .export import RECORD_NAME, REPORT_NAME, read_json
from .lora import summary as lora_summary
from .methods import METHODS

CARD_NAME = "README.md"
TAGS = ["concept-erasure", "stable-diffusion", "erase"]
LICENSE = ("## License\n\nNo license is set: the erased model derives from the base model, whose license applies. Add "
           "the `license:` that fits to the front matter above before publishing.")


def write_card(folder: Path, name: str | None = None) -> None:
    """Write <folder>/README.md, replacing the one there in a single rename. name: the folder's name for the loading
    code (default its own; save() writes into a temporary folder)."""
    record = read_json((folder / RECORD_NAME).read_text(), str(folder / RECORD_NAME))
    report = folder / "report" / REPORT_NAME
    evaluation = read_json(report.read_text(), str(report)) if report.is_file() else {}
    partial = folder / f".{CARD_NAME}.{os.getpid()}.partial"
    partial.write_text(card(record, name or folder.name, evaluation if "metrics" in evaluation else None))
    os.replace(partial, folder / CARD_NAME)


def base_model(source: str) -> str:
    """The base model as a reader can find it: a hub id or a model's own name (the miniature model's: mini) as erase.json
    records it, and a local folder or file by its name (a path on this machine means nothing elsewhere)."""
    path = Path(source)
    return path.name if path.is_absolute() or path.exists() else source


def card(record: dict, name: str, evaluation: dict | None = None) -> str:
    """The card's text; evaluation: the run's report.json, if it was evaluated."""
    base = base_model(record["model"]["source"])
    front = yaml.safe_dump({"base_model": base, "tags": TAGS, "library_name": "diffusers"}, sort_keys=False)
    version = f" ({record['model']['version']})" if record["model"].get("version") else ""
    intro = (f"`{base}`{version} with {len(record['concepts'])} concept(s) erased from its UNet by erase "
             f"{record['erase_version']}; its text encoder and VAE are the base model's.")
    sections = [f"---\n{front}---\n\n# {name}\n\n{intro}", concepts_section(record), method_section(record),
                evaluation_section(evaluation) if evaluation else None, files_section(record, name, base), LICENSE]
    return "\n\n".join(filter(None, sections)) + "\n"


def concepts_section(record: dict) -> str:
    rows = [f"| {c['name']} | {c['kind']} | {c.get('anchor') or '–'} |" for c in record["concepts"]]
    return "\n".join(["## Erased concepts", "", "| concept | kind | anchor |", "|---|---|---|", *rows])


def method_section(record: dict) -> str:
    method = record["method"]
    about = f"`{method}`" + (f": {METHODS[method].summary}" if method in METHODS else "")
    edited = sum(layer["edited"] for layer in record["layers"].values())
    text = f"## Method\n\n{about}. {edited} weights edited in {len(record['layers'])} layers.\n\n"
    if record.get("config") is None:  # a re-applied patch: its header names the method, not the settings
        return text + "Settings: those of the run that made the patch, which does not hold them."
    settings = yaml.safe_dump(record["config"], sort_keys=False).strip()
    return text + f"Settings (erase.json has them too, with the prompts and per-layer statistics):\n\n```yaml\n{settings}\n```"


def evaluation_section(evaluation: dict) -> str:
    settings, judge = evaluation["settings"], evaluation["settings"]["clip"]
    pretrained = f" ({judge['pretrained']})" if judge["pretrained"] else ""
    return (f"## Evaluation\n\nCLIP `{judge['model']}`{pretrained} judged images of the original and the erased model "
            f"from the same prompts and seeds ({settings['seeds']}); brackets: {settings['confidence']:.0%} bootstrap "
            "intervals. The whole report is report/report.md.\n\n" + "\n".join(summary_table(evaluation["metrics"]["summary"])))


def files_section(record: dict, name: str, base: str) -> str:
    pipeline, single, lora, patch = (record["model"]["pipeline"], record["single_file"], record.get("lora"),
                                     record.get("patch"))
    denoiser = record["model"].get("denoiser", "UNet2DConditionModel")
    folder = "unet" if denoiser == "UNet2DConditionModel" else "transformer"
    imports, load_base = base_pipeline(base, pipeline, folder, named=bool(record["model"].get("version")))
    denoiser_code = (f"```python\n{imports}from diffusers import {pipeline}, {denoiser}\n\n"
                     f"{folder} = {denoiser}.from_pretrained(\"{name}\", subfolder=\"{folder}\")  # this folder, or its "
                     f"repo id\n{load_base}\n```")
    paragraphs = ["## Files and how to load them",
                  f"`{folder}/`: the erased {denoiser} in diffusers format, in a pipeline of the base model:", denoiser_code]
    if single["name"] and single.get("holds") == "denoiser":
        paragraphs.append(f"`{single['name']}`: the erased {denoiser} alone in the {single['layout']} layout, or "
                          f"diffusers: `{denoiser}.from_single_file(\"{single['name']}\", config=\"{base}\", "
                          "subfolder=\"transformer\")` in a pipeline of the base model.")
    elif single["name"]:
        layout = single.get("layout", "original Stable Diffusion checkpoint (A1111, ComfyUI, Forge)")
        paragraphs.append(f"`{single['name']}`: the whole erased pipeline in the {layout} layout, or diffusers: "
                          f"`{pipeline}.from_single_file(\"{single['name']}\")` (with `config=` the base model's folder "
                          "or hub id where diffusers cannot tell its architecture).")
    if lora:
        form = ("a LoRA in diffusers' format (PEFT names) for diffusers and ComfyUI" if lora.get("format") == "diffusers"
                else "a kohya LoRA for A1111, ComfyUI and diffusers")
        paragraphs.append(f"`{lora['name']}`: the edit as {form} "
                          f"(`pipe.load_lora_weights(\"{name}\", weight_name=\"{lora['name']}\")` on a pipeline of the "
                          f"base model). {lora_summary(lora)}.")
    if patch:
        paragraphs.append(f"`{patch}`: the edit alone. `erase-concepts apply --patch {patch} --model {base} --out "
                          "FOLDER` writes this checkpoint again from the base model; `erase-concepts evaluate` and "
                          "`erase-concepts attack` read it.\n\n"
                          f"> **Warning:** {patch} lists every edited weight, a map for an attacker who would revive "
                          "the erased concepts. Keep it private: publish this folder without it.")
    paragraphs.append("`erase.json`: the whole record of the run: settings, prompts, per-layer statistics, timings, "
                      "versions.")
    return "\n\n".join(paragraphs)


def base_pipeline(base: str, pipeline: str, folder: str, named: bool) -> tuple[str, str]:
    """(imports, code) that load the base model with the erased denoiser (`folder`: unet or transformer): diffusers
    reads a hub id, a folder or a single file; a model known by its own name and version (the miniature model) is
    erase's to load."""
    if named:
        return "import erase\n", f'pipe = erase.load_pipeline("{base}")\npipe.{folder} = {folder}'
    if base.endswith(".safetensors"):
        return "", f'pipe = {pipeline}.from_single_file("{base}", {folder}={folder})'
    return "", f'pipe = {pipeline}.from_pretrained("{base}", {folder}={folder})'
