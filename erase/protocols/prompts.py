"""Any prompt file (CSV or TXT, optional seed and guidance columns), judged by the CLIP judge and by NudeNet: the
CLIP score of each image with its prompt and the paired similarity of the original and erased images, and the
exposed-class counts of the i2p protocol."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..evaluation import load_judge, nudenet_detector
from ..evaluation.judge import Judge
from ..evaluation.stats import Bootstrap
from ..families import denoiser_of
from ..profile import profile_of
from . import register
from .core import Images, Protocol, ProtocolSettings
from .i2p import NudityCount, nudity_counts, nudity_record, nudity_table
from .prompt_file import read_prompt_file


@dataclass
class JudgedByClip:
    """The CLIP judge's settings, shared by the protocols that score with it."""

    clip: str | None = None
    """'mini' or an open_clip architecture; None: the model's profile's (the miniature model: mini; any other:
    ViT-L-14)."""
    clip_pretrained: str | None = None
    """The open_clip pretrained tag or a local checkpoint (with clip); None: the profile's (openai)."""
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 0


@dataclass
class PromptsSettings(ProtocolSettings, NudityCount, JudgedByClip):
    """Any prompt file: CLIP score and paired similarity, and NudeNet's counts unless nudity is false."""

    nudity: bool = True
    """Count NudeNet's exposed classes too (needs the `nudity` extra)."""

    def validate(self) -> None:
        super().validate()
        self.validate_threshold()
        if self.clip:
            Judge.check(self.clip, self.clip_pretrained)


def checked_judge(pipe, settings: JudgedByClip) -> Judge:
    """The CLIP judge of the settings or of the model's profile, loaded on the CPU by a protocol's check(): before
    any image, and before the model where `pipe` only names it; `on_model` moves it to the model's device."""
    return load_judge(pipe, profile_of(pipe), settings.clip, settings.clip_pretrained, device="cpu")


def on_model(judge: Judge, pipe) -> Judge:
    return judge.to(denoiser_of(pipe).device)


def features(judge: Judge, files: list, batch: int = 32) -> torch.Tensor:
    """The judge's image features of PNG files, a batch at a time."""
    out = []
    for start in range(0, len(files), batch):
        images = [Image.open(path).convert("RGB") for path in files[start : start + batch]]
        out.append(judge.image_features(images))
    return torch.cat(out)


def clip_metrics(judge: Judge, images: Images, texts: list[str], settings: JudgedByClip) -> dict:
    """CLIP score of each side's images with their texts, and the paired similarity of original and erased, with
    bootstrap intervals over the images."""
    boot = Bootstrap(settings.bootstrap_samples, settings.bootstrap_seed)
    feats = {side: features(judge, files) for side, files in images.files.items()}
    estimates = {f"clip_score_{side}": boot.mean(judge.clip_scores(f, texts)) for side, f in feats.items()}
    estimates["paired_similarity"] = boot.mean((feats["original"] * feats["erased"]).sum(1))
    return {"judge": judge.describe(), **{k: {"value": e.value, "interval": e.interval(0.95)} for k, e in
                                          estimates.items()}}


def clip_lines(metrics: dict) -> list[str]:
    def cell(key: str) -> str:
        low, high = metrics[key]["interval"]
        return f"{metrics[key]['value']:.3f} [{low:.3f}, {high:.3f}]"

    j = metrics["judge"]
    return ["| CLIP score, original | CLIP score, erased | paired similarity |", "|---|---|---|",
            f"| {cell('clip_score_original')} | {cell('clip_score_erased')} | {cell('paired_similarity')} |", "",
            f"Judge: {j['model']} ({j['pretrained']}); CLIP score: 100 · cosine of each image with its prompt; paired "
            "similarity: cosine of the original and erased images of the same prompt and seed; 95% bootstrap "
            "intervals over the images."]


@register("prompts", PromptsSettings, "any prompt file: CLIP score, paired similarity and NudeNet counts")
class Prompts(Protocol):
    def check(self) -> None:
        self.detector = nudenet_detector("nudity=false") if self.settings.nudity else None  # loaded once
        self.judge = checked_judge(self.pipe, self.settings)

    def samples(self):
        return read_prompt_file(self.settings.prompts)

    def score(self, images: Images) -> dict:
        metrics = {"clip": clip_metrics(on_model(self.judge, self.pipe), images,
                                        [s.prompt for s in images.samples], self.settings)}
        if self.detector:
            metrics["nudity"] = {side: nudity_counts(files, self.settings.threshold, self.detector)
                                 for side, files in images.files.items()} | {
                "nudenet": nudity_record(self.settings.threshold)}
        return metrics

    def markdown(self, metrics: dict) -> list[str]:
        return clip_lines(metrics["clip"]) + (["", *nudity_table(metrics["nudity"])] if "nudity" in metrics else [])
