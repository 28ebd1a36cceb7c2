"""What every attack kind shares: its settings, its targets, and the scoring of attacked prompts with the judge.

The targets are the held-out prompts of each attacked concept (the evaluator's forget prompts), once per seed. The
original model generates them (their final latents are what an attack may learn from); the erased model generates
them as they are and as the attack rewrote them, from the same seeds; the judge classifies every image among the
concept's alternatives exactly as forgetting accuracy does. One UNet is in memory: the edit is applied and restored.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm

from ..concepts import Catalog, check_prompts_fit, load_catalog
from ..config import check_positive_int, config_from
from ..errors import EraseError
from ..evaluation import JudgedSettings, erasure_of, generate, load_judge
from ..evaluation.judge import Judge
from ..families import denoiser_of
from ..models import check_pipeline, image_side
from ..profile import profile_of
from ..versions import versions
from . import get_attack


@dataclass
class AttackSettings(JudgedSettings):
    """How attacked prompts are chosen, generated and judged; every attack kind's settings extend these."""

    prompts_per_concept: int = 4
    """Held-out prompts attacked per concept (the evaluator's first forget prompts), each once per seed; the same
    seeds generate the original, erased and attacked images."""
    batch_size: int = 8
    """Images per generation batch, and attacked prompts optimised together."""
    seed: int = 0
    """Seed of the attack's own draws (initial tokens, timesteps, noise): the same seed finds the same prompts."""
    sample_steps: int = 25
    """Sampler steps of every generated image (the pipeline's own scheduler)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("sample_steps", self.sample_steps)


@dataclass
class Target:
    """One attacked prompt: its concept, held-out prompt and seed, and the original model's final latents of it."""

    concept: str
    prompt: str
    seed: int
    latents: torch.Tensor | None = None
    text: str = ""
    """The concept's name as its prompts hold it (the catalog's text)."""


def attack_config(kind: str, config=None, **overrides):
    """A kind's settings from a dataclass, a dict or a YAML file (its `kind:`, if any, must be `kind`), plus overrides."""
    return config_from(get_attack(kind).config_class, config, "kind", kind, "config={'steps': 100}", **overrides)


def attack(original, erased, concepts: list[str] | str | None = None, kind: str = "prompt", config=None,
           clip: str | Judge | None = None, clip_pretrained: str | None = None, catalog: str | Catalog | None = None,
           progress: bool = True, **overrides):
    """Attack an erasure: the share of attacked prompts whose images the judge classifies as the concept.

    erased: the EraseResult of erase(original, ...) or a saved run's folder (its patch applies to `original`, its
    base). concepts: which of the erased concepts to attack (default: all). kind: an attack kind of ATTACKS.
    config: its settings (dataclass, dict or YAML file); keyword overrides win (e.g. steps=100). clip: as evaluate.
    Returns an AttackReport; .save(folder) adds it to the report there.
    """
    from .report import AttackReport

    check_pipeline(original, f"the original given ({type(original).__name__})")
    spec = get_attack(kind)
    cfg = replace(attack_config(kind, config, **overrides))  # fill_defaults below leaves the caller's config as it is
    erasure = erasure_of(original, erased)
    catalog = catalog if isinstance(catalog, Catalog) else load_catalog(catalog or erasure.catalog)
    chosen = chosen_concepts(erasure.concepts, concepts)
    profile = profile_of(original)
    cfg.fill_defaults(profile)
    targets = [Target(c.name, prompt, seed, text=c.text) for c in chosen
               for prompt in catalog.eval_prompts(c, cfg.prompts_per_concept) for seed in cfg.seeds]
    anchors = [Target(c.name, c.anchor, seed) for c in chosen if c.anchor for seed in cfg.seeds]
    check_prompts_fit(original.tokenizer, chosen, catalog)
    if spec.check is not None:
        spec.check(original, [t.prompt for t in targets], cfg)
    side = image_side(original, cfg.resolution)
    judge = load_judge(original, profile, clip, clip_pretrained)

    def images(targets: list[Target], prompts: list[str] | None = None, latents: list | None = None) -> list:
        return generate(original, prompts or [t.prompt for t in targets], [t.seed for t in targets], cfg.sample_steps,
                        cfg.guidance_scale, side, cfg.batch_size, bar, latents)

    timings = {}
    started = time.perf_counter()
    with tqdm(total=3 * len(targets) + len(anchors), desc="generating", unit="image", disable=not progress) as bar:
        latents: list = []
        original_images, anchor_images = images(targets, latents=latents), images(anchors)
        for target, x0 in zip(targets, latents):
            target.latents = x0
        with erasure.edit.applied_to(denoiser_of(original)):
            erased_images = images(targets)
        timings["generation_s"] = time.perf_counter() - started
        bar.clear()
        started = time.perf_counter()
        found, attacked_edit = spec.run(original, erasure.edit, targets, cfg, progress)
        timings["attack_s"] = time.perf_counter() - started
        started = time.perf_counter()
        with attacked_edit.applied_to(denoiser_of(original)):
            attacked_images = images(targets, [f["prompt"] for f in found])
        timings["generation_s"] += time.perf_counter() - started
    settings = {"kind": kind, **asdict(cfg), "sampler": type(original.scheduler).__name__,
                "sampler_config": dict(original.scheduler.config), "catalog": catalog.name, "method": erasure.method,
                "base_fingerprint": erasure.base_fingerprint, "concepts": [c.as_dict() for c in erasure.concepts],
                "attacked": [c.name for c in chosen], "versions": versions(),
                **{k: round(v, 3) for k, v in timings.items()}}
    return AttackReport.build(targets, found, (original_images, erased_images, attacked_images), anchors,
                              anchor_images, judge, catalog, chosen, settings)


def chosen_concepts(erased: list, names: list[str] | str | None) -> list:
    """The erased concepts to attack: all of them, or those named (each must be one of them)."""
    if names is None:
        return list(erased)
    names = [n.strip().lower() for n in (names.split(",") if isinstance(names, str) else names)]
    by_name = {c.name: c for c in erased}
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise EraseError(f"concept {unknown[0] if unknown else ''!r} was not erased by this run: attack one of "
                         f"{', '.join(by_name)} (or leave concepts out to attack them all)")
    return [by_name[n] for n in dict.fromkeys(names)]
