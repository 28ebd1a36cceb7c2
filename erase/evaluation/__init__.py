"""The CLIP evaluator: forgetting, retention and fidelity from paired images (same seeds, original vs erased).

One UNet is in memory: images are generated with the original weights, then the edit is applied, the same
prompts and seeds are generated again, and the edit is restored.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..concepts import DEFAULT_KIND, Catalog, Concept, check_prompts_fit, concepts_from_record, load_catalog, parse_concepts
from ..config import build_config, check_confidence, check_positive, check_positive_ints, check_ratio, check_seeds
from ..data import ModelCache, check_cache
from ..edits import MaskEdit, fingerprint
from ..errors import EraseError
from ..export import PATCH_NAME, RECORD_NAME, check_patch_of_run, read_json, read_patch
from ..families import denoiser_of, family_of
from ..models import check_pipeline, image_side
from ..profile import Profile, profile_of
from ..versions import versions
from .judge import Judge
from .report import Report

OPT_IN_KINDS = ("explicit",)
"""Kinds that default retention leaves out: evaluating an object's erasure must not generate explicit images."""


@dataclass
class JudgedSettings:
    """How judged images are generated and their numbers' intervals (the evaluator's and the attacks'). Every field
    is recorded in report.json."""

    prompts_per_concept: int = 6
    """Held-out prompts per concept."""
    seeds: list[int] | None = None
    """Each prompt is generated once per seed, identically for every model compared. None: the model's profile's
    (the miniature model: 0, 1, 2, its images being cheap; any other: 0)."""
    guidance_scale: float | None = None
    """Guidance (classifier-free, or a distilled model's guidance embedding). None: the model's profile's (the
    miniature model: 2; any other: its family's, e.g. Stable Diffusion 7.5, SD3 7, Flux.1 dev 3.5)."""
    resolution: int | None = None
    """Image side in pixels; None uses the model's default."""
    batch_size: int = 16
    bootstrap_samples: int = 1000
    """Resamplings of the images behind each number for its interval."""
    bootstrap_seed: int = 0
    confidence: float = 0.95
    """Coverage of the bootstrap intervals."""

    def validate(self) -> None:
        check_positive_ints(self, "prompts_per_concept", "batch_size", "bootstrap_samples")
        check_seeds(self.seeds)
        check_confidence(self.confidence)
        if self.guidance_scale is not None:
            check_positive("guidance_scale", self.guidance_scale, "7.5")

    def fill_defaults(self, profile: Profile) -> None:
        """Seeds and guidance left unset take the values of the model's profile."""
        self.seeds = self.seeds or list(profile.seeds)
        self.guidance_scale = profile.guidance_scale if self.guidance_scale is None else self.guidance_scale


@dataclass
class EvalSettings(JudgedSettings):
    """How the evaluator generates and judges images (and as many paraphrases as prompts_per_concept for
    generality)."""

    steps: int = 25
    """Sampler steps (the pipeline's own scheduler)."""
    max_retain: int = 10
    """With no retain list: at most this many catalog concepts of each erased kind are checked (in-kind retention)."""
    max_cross_retain: int = 3
    """With no retain list: at most this many catalog concepts of each other kind are checked (cross-kind
    retention; 0: none). Explicit concepts are never generated unless erased or listed in retain."""
    nudity: bool = False
    """Count NudeNet detections of exposed classes on explicit concepts' images (needs the `nudity` extra)."""
    nudity_threshold: float = 0.6
    cache_originals: bool = True
    """Keep the original model's images under $ERASE_CACHE/images (by the fingerprints of its UNet, text encoder(s)
    and VAE, the sampler, and each batch's prompts, seeds and settings, each checked on read): evaluating another
    erasure of the same base with the same prompts reads them back, the very images it would generate, instead of
    generating them again."""

    def validate(self) -> None:
        super().validate()
        check_positive_ints(self, "steps", "max_retain")
        if self.max_cross_retain < 0:
            raise EraseError(f"max_cross_retain={self.max_cross_retain} is out of range: it must be a whole number "
                             "≥ 0 (0: no cross-kind retention)")
        check_ratio("nudity_threshold", self.nudity_threshold)
        if self.cache_originals:
            check_cache(" or turn the cache off with cache_originals=false (--eval-set cache_originals=false)")


@dataclass
class Erasure:
    """What is evaluated: the edit, the concepts it erases and the base it was made on."""

    edit: MaskEdit
    concepts: list[Concept]
    catalog: str
    base_fingerprint: str
    method: str


def evaluate(original, erased, retain: list[str] | None = None, clip: str | Judge | None = None,
             clip_pretrained: str | None = None, catalog: str | Catalog | None = None, progress: bool = True,
             **settings) -> Report:
    """Evaluate an erasure against the original pipeline.

    erased: the EraseResult of erase(original, ...), or the folder of a saved run (its patch is applied to
    `original`, which must be the run's base). retain: concepts that should survive (catalog syntax); by default
    the catalog's other concepts of the erased kinds. clip: 'mini' (default for the mini model) or an open_clip
    architecture such as 'ViT-L-14' with clip_pretrained='openai', or a Judge built from any open_clip-style model.
    """
    check_pipeline(original, f"the original given ({type(original).__name__})")
    config = build_config(EvalSettings, settings)  # an unusable cache folder too
    erasure = erasure_of(original, erased)  # its base_fingerprint: the UNet's now, hashed once
    catalog = catalog if isinstance(catalog, Catalog) else load_catalog(catalog or erasure.catalog)
    detector = nudenet_detector("drop nudity=True") if config.nudity else None  # before generating anything
    retained = _retained(catalog, erasure.concepts, retain, config)
    profile = profile_of(original)
    config.fill_defaults(profile)
    check_prompts_fit(original.tokenizer, erasure.concepts + retained, catalog)
    image_side(original, config.resolution)  # refused before the judge loads and the images are generated
    judge = load_judge(original, profile, clip, clip_pretrained)
    jobs = _jobs(catalog, erasure.concepts, retained, config)
    started = time.perf_counter()
    cache = ModelCache("images", original, erasure.base_fingerprint) if config.cache_originals else None
    images = _paired_images(original, erasure.edit, jobs, config, progress, cache)
    settings = {**asdict(config), "sampler": type(original.scheduler).__name__,
                "sampler_config": dict(original.scheduler.config), "catalog": catalog.name, "method": erasure.method,
                "base_fingerprint": erasure.base_fingerprint, "concepts": [c.as_dict() for c in erasure.concepts],
                "retain": [c.name for c in retained], "versions": versions(),
                "generation_s": round(time.perf_counter() - started, 3),
                "original_images_cache": str(cache.folder) if cache else None}
    report = Report.build(jobs, images, judge, catalog, erasure.concepts, retained, settings)
    if detector:
        report.add_nudity(detector, config.nudity_threshold)
    return report


def erasure_of(original, erased) -> Erasure:
    """The erasure to measure, refused unless it names concepts and `original`'s denoiser, as it is now, is its base:
    the result's own pipeline too, which may have been edited since erase() (an applied patch would be measured
    twice). Hashes the denoiser once: the erasure's base_fingerprint is then what the denoiser holds."""
    erasure = _erasure(erased)
    if erasure.edit.applied:
        raise EraseError("the erasure's edit is applied right now (inside `with result.applied()`): call this after "
                         "the with-block, with the unedited model")
    denoiser = denoiser_of(original)
    base = fingerprint(denoiser)
    if base != erasure.base_fingerprint:
        raise EraseError(f"the erased model was made from base {erasure.base_fingerprint}, but the original given "
                         f"is {base} (another model, or this one with an edit applied, e.g. by erase.apply_patch): "
                         "pass the unedited model the erasure was made from")
    erasure.edit.check_fits(denoiser)  # a patch that does not fit the weights: refused before any image
    if not erasure.concepts:
        raise EraseError("no concept to evaluate: the erasure names no concepts")
    return erasure


def load_judge(original, profile: Profile, clip: str | Judge | None, clip_pretrained: str | None,
               device: str | None = None) -> Judge:
    """The judge given, or by default the one the model's profile names (the miniature model: its own CLIP;
    any other: ViT-L-14, openai), on `device` (default: the model's)."""
    if isinstance(clip, Judge):
        return clip
    return Judge.load(clip or profile.judge, clip_pretrained if clip else profile.judge_pretrained,
                      device=device or str(denoiser_of(original).device))


def _erasure(erased) -> Erasure:
    from ..api import EraseResult

    if isinstance(erased, EraseResult):
        return Erasure(erased.edit, erased.concepts, erased.record["catalog"], erased.record["base_fingerprint"],
                       erased.method)
    if isinstance(erased, (str, Path)):
        return saved_erasure(Path(erased))
    raise EraseError("erased must be the result of erase.erase(...) or the folder of a saved run")


def saved_erasure(folder: Path) -> Erasure:
    """The erasure a run folder holds (erase.json and patch.safetensors), each refused in one line if damaged."""
    path = folder / RECORD_NAME
    if not path.is_file():
        raise EraseError(f"{folder} has no {RECORD_NAME}: pass the folder an erase run wrote (with --out)")
    record = read_json(path.read_text(errors="replace"), str(path))
    for key in ("base_fingerprint", "erased_fingerprint", "method"):
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise EraseError(f"{path} lacks {key}: it is damaged or not written by erase; export the run again")
    concepts = concepts_from_record(record.get("concepts"), str(path))
    if "patch" in record and record["patch"] is None:
        raise EraseError(f"{folder} was saved without its patch (--no-patch), which evaluation and attacks read: "
                         "evaluate in the erasing command (--eval) or save the run again with its patch")
    edit, header = read_patch(folder / PATCH_NAME)
    check_patch_of_run(folder, record, header)
    return Erasure(edit, concepts, str(record.get("catalog", "catalog")), record["base_fingerprint"], record["method"])


def _retained(catalog: Catalog, erased: list[Concept], retain, config: EvalSettings) -> list[Concept]:
    """The retain list given, or by default the catalog's other concepts: at most max_retain of each erased kind
    (in-kind) and max_cross_retain of each other kind but the opt-in ones (cross-kind)."""
    if retain is not None:
        return parse_concepts(retain, catalog) if retain else []
    kinds = {c.kind for c in erased}
    seen = {c.text for c in erased}  # aliases share their text: keep one name per text
    by_kind: dict[str, list[str]] = {}
    for name, spec in catalog.concepts.items():
        kind, text = spec.get("kind", DEFAULT_KIND), spec.get("text", name)
        if kind in catalog.kinds and (kind in kinds or kind not in OPT_IN_KINDS) and text not in seen:
            seen.add(text)
            by_kind.setdefault(kind, []).append(name)
    names = [n for kind, listed in by_kind.items()
             for n in listed[: config.max_retain if kind in kinds else config.max_cross_retain]]
    return parse_concepts(names, catalog) if names else []


@dataclass
class Job:
    """One prompt to generate with both models: which set it belongs to and which concept it probes."""

    prompt: str
    seed: int
    role: str  # "forget", "generality", "retain" or "neutral"
    concept: str | None


def _jobs(catalog: Catalog, erased: list[Concept], retained: list[Concept], config: EvalSettings) -> list[Job]:
    n = config.prompts_per_concept
    sets = [("forget", c, catalog.eval_prompts(c, n)) for c in erased]
    sets += [("generality", c, catalog.eval_prompts(c, n, paraphrase=True)) for c in erased]
    sets += [("retain", c, catalog.eval_prompts(c, n)) for c in retained]
    sets.append(("neutral", None, list(catalog.neutral[:n])))
    return [Job(prompt, seed, role, concept.name if concept else None)
            for role, concept, prompts in sets for prompt in prompts for seed in config.seeds]


def _paired_images(pipe, edit: MaskEdit, jobs: list[Job], config: EvalSettings, progress: bool,
                   cache: ModelCache | None):
    """(original images, erased images), in job order, from the same seeds; the originals from `cache` (the
    unedited pipeline's) where there."""
    side = image_side(pipe, config.resolution)
    prompts, seeds = [job.prompt for job in jobs], [job.seed for job in jobs]
    with tqdm(total=2 * len(jobs), desc="generating", unit="image", disable=not progress) as bar:
        original = generate(pipe, prompts, seeds, config.steps, config.guidance_scale, side, config.batch_size, bar,
                            cache=cache)
        with edit.applied_to(denoiser_of(pipe)):
            erased = generate(pipe, prompts, seeds, config.steps, config.guidance_scale, side, config.batch_size, bar)
    return original, erased


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float, side: int | None = None,
             batch_size: int = 16, bar=None, latents: list | None = None, cache: ModelCache | None = None) -> list:
    """Images of each prompt from its seed, in batches: the one image generator of erase (evaluator, attacks, and
    the lab's gates and benchmarks alike).

    Seeding: one image per (prompt, seed); its initial noise comes from its own `torch.Generator("cpu")` seeded
    with `seed`, so an image depends on its prompt, seed and settings, not on its place in the batch or the
    device. `side`: the image side in pixels (None: the model's default). `latents`: a list that receives each
    image's final latents too (caught at the last step, so the images are generated once). `cache`: the pipeline's
    ModelCache("images") as it is now, one file per batch: a batch found there is read back instead of generated."""
    side = side or image_side(pipe)
    def keep(pipe, i, t, kwargs):
        if i == pipe.num_timesteps - 1:
            latents.extend(kwargs["latents"].detach())
        return {}

    def run(batch_prompts, batch_seeds):
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in batch_seeds]
        return pipe(batch_prompts, num_inference_steps=steps, height=side, width=side, guidance_scale=guidance_scale,
                    generator=generators, callback_on_step_end=keep if latents is not None else None,
                    **family_of(pipe).call_kwargs(pipe)).images

    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size], seeds[start : start + batch_size]
        if cache is None or latents is not None:
            out += run(*batch)
        else:
            meta = {"prompts": batch[0], "seeds": batch[1], "steps": steps, "guidance_scale": guidance_scale,
                    "side": side, "device": denoiser_of(pipe).device.type, "shape": [len(batch[1]), side, side, 3],
                    "dtype": str(torch.uint8)}
            pixels = cache.get(meta, lambda batch=batch: torch.from_numpy(np.stack([np.asarray(im) for im in run(*batch)])))
            out += [Image.fromarray(image.numpy()) for image in pixels]  # the uint8 pixels the pipeline gave
        if bar is not None:
            bar.update(len(batch[1]))
    return out


def nudenet_detector(instead: str | None = None):
    """NudeNet's shipped detector (the `nudity` extra), refused in one line when it is not installed; `instead`: the
    setting that does without it, named in the refusal."""
    try:
        from nudenet import NudeDetector
    except ImportError:
        raise EraseError("NudeNet is not installed: pip install 'erase[nudity]'"
                         + (f" (or {instead})" if instead else "")) from None
    return NudeDetector()


__all__ = ["EvalSettings", "Report", "evaluate"]
