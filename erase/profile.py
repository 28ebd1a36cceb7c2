"""A model's profile: the defaults that go with the model rather than with a method or the evaluator.

A pipeline folder may carry them in `erase_profile.json` beside its model_index.json (the shipped miniature model
does); any other model gets the defaults of its model family (its pipeline's own guidance). Nothing in erase tests a
model's name to choose them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import EraseError

PROFILE_NAME = "erase_profile.json"
MINI_PIPELINE_DIR = Path(__file__).parent / "assets" / "mini" / "pipeline"
MINI_DIT_PIPELINE_DIR = Path(__file__).parent / "assets" / "mini-dit" / "pipeline"
EMBEDDED = {"mini": MINI_PIPELINE_DIR, "mini-dit": MINI_DIT_PIPELINE_DIR}
"""The models erase ships, by the name --model takes: the miniature Stable Diffusion and the miniature SD3."""


@dataclass(frozen=True)
class Profile:
    """Defaults for erasing and evaluating one model. Every field can be overridden where it is used."""

    name: str | None = None
    """The model's own name where it has one (the miniature model: "mini"); None for a model known by its path."""
    version: str | None = None
    """The version of that model (the miniature model: "mini-2")."""
    catalog: str = "catalog"
    """The prompt catalog its concepts are named in: "catalog" (real-world concepts) or "mini"."""
    judge: str = "ViT-L-14"
    """The CLIP judge the evaluator and attacks read its images with: an open_clip architecture, or "mini"."""
    judge_pretrained: str | None = "openai"
    """The judge's open_clip pretrained tag (None for the miniature world's own CLIP)."""
    guidance_scale: float = 7.5
    """The guidance its images are drawn at (classifier-free, or a distilled model's guidance embedding)."""
    seeds: tuple[int, ...] = (0,)
    """The seeds each evaluation prompt is drawn with: one image per prompt and seed."""
    max_sequence_length: int | None = None
    """SD3: how many T5 tokens its text sequence has (zeros where the pipeline runs without T5), as every call of
    the pipeline and its encode_prompt is passed it; None: the pipeline's own default (256). The miniature SD3 is
    trained with 1."""

    def describe(self) -> str:
        """The model as a record names it: its version, or its name."""
        return self.version or self.name or "unnamed"


def folder_of(model) -> Path | None:
    """The pipeline folder behind `model`: a shipped model's name ("mini", "mini-dit"), a folder path, or a pipeline
    loaded from a folder."""
    ref = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", None)
    if not ref:
        return None
    folder = EMBEDDED.get(str(ref)) or Path(ref).expanduser()
    return folder if folder.is_dir() else None


def profile_of(model) -> Profile:
    """The profile of `model` (a pipeline, or what --model names, read before the model loads)."""
    folder = folder_of(model)
    path = folder / PROFILE_NAME if folder else None
    if path is None or not path.is_file():
        if isinstance(model, (str, Path)):
            return Profile()
        from .families import family_of

        return Profile(guidance_scale=family_of(model).guidance_scale(model))
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(Profile)}
        if not isinstance(data, dict) or set(data) - known:
            raise ValueError(f"expected an object with the keys {', '.join(sorted(known))}")
        return Profile(**{**data, "seeds": tuple(data.get("seeds", Profile.seeds))})
    except (ValueError, TypeError) as exc:
        raise EraseError(f"{path} is not a valid erase profile ({exc}): fix it or delete it to use the Stable "
                         "Diffusion defaults") from None
