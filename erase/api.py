"""The Python API: erase(pipe, concepts, ...) → EraseResult, which applies, restores and saves the edit."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from .card import write_card
from .concepts import Catalog, Concept, check_prompts_fit, concepts_from_record, load_catalog, parse_concepts
from .config import as_dict, config_from
from .edits import MaskEdit, fingerprint
from .errors import EraseError
from .export import (PATCH_NAME, RECORD_NAME, atomic_dir, check_output_dir, check_patch_base, nbytes, read_patch,
                     save_patch, write_json)
from .families import denoiser_of, family_of
from .lora import check_lora_method, lora_name, parse_rank, save_lora, to_lora
from .methods import check_concepts, get_method
from .models import check_pipeline, image_side, model_record
from .profile import profile_of
from .versions import versions


@dataclass
class EraseResult:
    """What erase() returns: the pipeline it was computed on (left unchanged), the edit, and the record."""

    pipe: object
    edit: MaskEdit
    method: str
    config: object
    concepts: list[Concept]
    record: dict = field(default_factory=dict)

    @contextmanager
    def applied(self):
        """The pipeline with the edit applied inside the with-block, restored bit-exactly after it."""
        with self.edit.applied_to(denoiser_of(self.pipe)):
            yield self.pipe

    def layer_table(self) -> list[dict]:
        kept = self.record.get("fusion", {}).get("kept_agnostic", {})
        return [{"layer": name.removesuffix(".weight"), "weights": s["numel"], "edited": s["edited"],
                 "kept_agnostic": kept.get(name.removesuffix(".weight"), 0)}
                for name, s in self.edit.stats().items()]

    def summary(self) -> str:
        """A plain-text table: edited (for masking methods: masked) weights per layer, totals, time, peak memory."""
        rows = self.layer_table()
        width = max(len(r["layer"]) for r in rows)
        lines = [f"{'layer':<{width}}  {'weights':>10}  {'edited':>8}  {'%':>6}  {'kept':>6}"]
        for r in rows:
            lines.append(f"{r['layer']:<{width}}  {r['weights']:>10}  {r['edited']:>8}  "
                         f"{100 * r['edited'] / r['weights']:>6.3f}  {r['kept_agnostic']:>6}")
        total = self.record["totals"]
        lines.append(f"{'total':<{width}}  {total['target_weights']:>10}  {total['edited']:>8}  "
                     f"{100 * total['edited_of_targets']:>6.3f}")
        lines.append(f"{self.method}: {len(self.concepts)} concept(s) in {self.record['timings']['total_s']:.1f} s, "
                     f"peak memory {self.record['peak_memory_mb']:.0f} MB ({self.record['peak_memory_kind']})")
        if not total["edited"]:
            lines.append("no weight changed in the model's dtype: this erasure is a no-op (the erased model is the base)")
        return "\n".join(lines)

    def save(self, out: str | Path, overwrite: bool = False, single_file: bool | None = None,
             half: bool = False, lora: int | str | None = None, patch: bool = True) -> Path:
        """Write the erased denoiser in diffusers format (unet/ or transformer/), <out name>.safetensors (the
        family's single-file layout), patch.safetensors, erase.json and README.md (a Hugging Face model card: base
        model, concepts, method, how to load each file).

        single_file: None writes the single file where the model family has a community layout (SD1.x, SD2.x and
        SDXL: the original checkpoint; SD3: SAI's; Flux: BFL's transformer file) and records why not otherwise; True
        requires it; False skips it. half: store the single file in float16.
        lora: also write <out name>-lora-r<rank>.safetensors, the edit as a LoRA of that rank (or 'full'; kohya's
        format for a UNet, diffusers' for a transformer), for training methods only; erase.json's `lora` says what it
        leaves out. patch: False leaves the patch out: it lists every edited weight, a map for an attacker (revival
        attack), and evaluate/attack read a saved run through it. Atomic.
        """
        out = check_output_dir(out, overwrite)
        family = family_of(self.pipe)
        problem = family.single_file_problem(self.pipe) if single_file is not False else "not asked for"
        if single_file and problem:
            raise EraseError(problem)
        if lora is not None:
            lora = parse_rank(lora)
            check_lora_method(get_method(self.method), lora)
        started = time.perf_counter()
        record = dict(self.record)
        single = not problem
        denoiser = family.denoiser(self.pipe)
        text_encoders = [getattr(self.pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        components = nbytes(denoiser, self.pipe.vae, *text_encoders) // (1 + half) if single else 0
        low_rank = None if lora is None else to_lora(denoiser, self.edit, lora)
        lora_bytes = sum(t.numel() * t.element_size() for t in low_rank.tensors.values()) if low_rank else 0
        with atomic_dir(out, overwrite, size=nbytes(denoiser) + components + lora_bytes) as tmp:
            with self.applied() as pipe:
                denoiser.save_pretrained(tmp / family.attribute, safe_serialization=True)
                record["erased_fingerprint"] = fingerprint(denoiser)
                header = {key: record[key] for key in ("base_fingerprint", "erased_fingerprint")}
                header.update(method=self.method, concepts=[c.as_dict() for c in self.concepts],
                              erase_version=record["versions"]["erase"])
                if single:
                    record["single_file"] = {"name": f"{out.name}.safetensors", "dtype": "float16" if half else "native",
                                             "layout": family.single_file, "holds": family.single_file_holds}
                    family.save_single_file(pipe, tmp / record["single_file"]["name"], header, half=half)
                else:
                    record["single_file"] = {"name": None, "why": problem}
            record["patch"] = PATCH_NAME if patch else None
            if patch:
                save_patch(tmp / PATCH_NAME, self.edit, header)
            if low_rank:
                record["lora"] = {"name": lora_name(out, lora), **low_rank.record}
                save_lora(tmp / record["lora"]["name"], low_rank, header)
            record["timings"] = dict(record["timings"], export_s=round(time.perf_counter() - started, 3))
            write_json(tmp / RECORD_NAME, record)
            write_card(tmp, out.name)
        self.record = record
        return out


def result_from_patch(pipe, patch: str | Path) -> EraseResult:
    """The result a saved patch stands for on `pipe` (its base), ready to save() as a full erased checkpoint."""
    edit, header = read_patch(patch)
    base = check_patch_base(pipe, patch, edit, header)
    concepts = concepts_from_record(header["concepts"], f"the header of {patch}")
    record = {"erase_version": versions()["erase"], "applied_patch": str(patch), "model": model_record(pipe),
              "base_fingerprint": base,
              "catalog": profile_of(pipe).catalog,
              "method": header["method"], "concepts": [c.as_dict() for c in concepts],
              "patch_erase_version": header["erase_version"], "layers": edit.stats(), "timings": {},
              "versions": versions()}
    return EraseResult(pipe, edit, header["method"], None, concepts, record)


def resolve_config(method: str, config=None, **overrides):
    """A method's config from a dataclass instance, a preset (file or shipped name) or a dict, plus overrides."""
    return config_from(get_method(method).config_class, config, "method", method,
                       "config='fia-style' or config={'r2': 0.02}", **overrides)


def erase(pipe, concepts, method: str = "fia", config=None, catalog: str | Catalog | None = None,
          progress: bool = True, **overrides) -> EraseResult:
    """Compute the edit that erases `concepts` from `pipe`'s denoiser (its UNet or transformer). The pipeline itself is
    left unchanged.

    concepts: "van gogh,nudity", or a list of names ("kind:name", "name=>anchor") or Concept objects.
    config: a preset name or YAML path, a dict or a config dataclass; keyword overrides win (e.g. r2=0.02).
    """
    check_pipeline(pipe, f"the pipeline given ({type(pipe).__name__})")
    spec = get_method(method)
    cfg = resolve_config(method, config, **overrides)
    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog or profile_of(pipe).catalog)
    concept_list = parse_concepts(concepts, catalog)
    check_concepts(method, concept_list, cfg)
    family = family_of(pipe)
    family.check_method(spec)
    for name in ("guidance_scale", "sample_guidance"):  # unset: the model family's own, recorded as used
        if getattr(cfg, name, 0) is None:
            cfg = replace(cfg, **{name: family.guidance_scale(pipe)})
    check_prompts_fit(pipe.tokenizer, concept_list, catalog)
    image_side(pipe, getattr(cfg, "resolution", None))  # refused now rather than after a minute of work
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    base = fingerprint(family.denoiser(pipe))
    fingerprint_s = time.perf_counter() - started
    edit, run_record = spec.run(pipe, concept_list, catalog, cfg, progress=progress, denoiser_fingerprint=base)
    total = time.perf_counter() - started
    record = _record(pipe, spec.name, cfg, concept_list, catalog, edit, run_record, base)
    record["timings"] = dict(run_record.get("timings", {}), fingerprint_s=round(fingerprint_s, 3),
                             total_s=round(total, 3))
    record["peak_memory_mb"], record["peak_memory_kind"] = peak_memory_mb(family.denoiser(pipe).device)
    return EraseResult(pipe, edit, spec.name, cfg, concept_list, record)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


def _record(pipe, method, config, concepts, catalog, edit, run_record, base) -> dict:
    denoiser_weights = sum(p.numel() for p in denoiser_of(pipe).parameters())
    stats = edit.stats()
    targets = sum(s["numel"] for s in stats.values())
    edited = sum(s["edited"] for s in stats.values())
    return {
        "erase_version": versions()["erase"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_record(pipe),
        "base_fingerprint": base,
        "method": method,
        "config": as_dict(config),
        "seed": config.seed,
        "catalog": catalog.name,
        "concepts": [c.as_dict() for c in concepts],
        **{k: v for k, v in run_record.items() if k != "timings"},
        "layers": {name.removesuffix(".weight"): s for name, s in stats.items()},
        "totals": {"target_weights": targets, "edited": edited, "edited_of_targets": edited / max(targets, 1),
                   "denoiser_weights": denoiser_weights, "edited_of_denoiser": edited / denoiser_weights},
        "versions": versions(),
    }

