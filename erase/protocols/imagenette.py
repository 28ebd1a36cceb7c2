"""The Imagenette protocol (ESD, FIA and most object-erasure papers): N images of each of the ten Imagenette classes
from "an image of a {class}", classified by a ResNet-50 trained on ImageNet; top-1 accuracy per class, original
against erased. The classifier is torchvision's ResNet-50 with its ImageNet weights, from the local torch cache or a
file; on the miniature world, whose images no ImageNet classifier can read, its own CLIP judge stands in (zero-shot
among the ten classes) and the report says so."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..config import check_positive_int
from ..errors import EraseError
from ..evaluation.stats import Bootstrap
from ..profile import profile_of
from . import register
from .core import Images, Protocol, ProtocolSettings, Sample, read_weights
from .prompts import JudgedByClip, checked_judge, features, on_model

IMAGENET_INDEX = {"tench": 0, "english springer": 217, "cassette player": 482, "chain saw": 491, "church": 497,
                  "french horn": 566, "garbage truck": 569, "gas pump": 571, "golf ball": 574, "parachute": 701}
"""The ten Imagenette classes and their ImageNet-1k indices."""
RESNET50_FILE = "resnet50-0676ba61.pth"
"""torchvision's ResNet-50 ImageNet weights (IMAGENET1K_V1, the classifier of the papers' scripts) in its cache."""


@dataclass
class ImagenetteSettings(ProtocolSettings, JudgedByClip):
    """N images per class at seeds 0…N−1, guidance_scale (the model's by default), a ResNet-50 top-1."""

    images_per_class: int = 500
    classes: list[str] = field(default_factory=lambda: list(IMAGENET_INDEX))
    """Which of the ten classes to generate (all by default)."""
    template: str = "an image of a {}"
    classifier: str | None = None
    """A ResNet-50 ImageNet state dict (torchvision's layout; .pth, read with weights_only, or .safetensors); None:
    torchvision's IMAGENET1K_V1 weights from the local torch cache, or on the miniature world its CLIP judge."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("images_per_class", self.images_per_class)
        if not self.classes:
            raise EraseError(f"classes is empty: name at least one of {', '.join(IMAGENET_INDEX)}")
        if unknown := [c for c in self.classes if c not in IMAGENET_INDEX]:
            raise EraseError(f"classes: unknown {unknown}; the Imagenette classes: {', '.join(IMAGENET_INDEX)}")
        if "{}" not in self.template:
            raise EraseError(f"template={self.template!r} has no {{}} for the class name: e.g. 'an image of a {{}}'")
        if self.prompts is not None:
            raise EraseError("the imagenette protocol makes its own prompts (template, classes): drop --prompts")
        if self.classifier and not Path(self.classifier).expanduser().is_file():
            raise EraseError(f"classifier {self.classifier} does not exist: pass a ResNet-50 ImageNet state dict file")


def resnet50(path: str | None) -> torch.nn.Module:
    """torchvision's ResNet-50 with ImageNet weights from `path` or the local torch cache, refused in one line when
    there are none (nothing is downloaded)."""
    from torchvision.models import resnet50 as build

    if path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / RESNET50_FILE
        if not cached.is_file():
            raise EraseError(f"no ResNet-50 ImageNet weights in the local torch cache ({cached}): put torchvision's "
                             f"{RESNET50_FILE} there, or pass --eval-set classifier=FILE")
        path = str(cached)
    state = read_weights(path, "classifier")
    model = build()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise EraseError(f"classifier {path} is not a torchvision ResNet-50 state dict ({str(exc)[:120]}…)") from None
    return model.eval()


@torch.no_grad()
def resnet_top1(model: torch.nn.Module, files: list, batch: int = 32) -> list[int]:
    """ImageNet top-1 class of each PNG, with torchvision's ImageNet preprocessing."""
    from torchvision.models import ResNet50_Weights

    preprocess = ResNet50_Weights.IMAGENET1K_V1.transforms()
    out = []
    for start in range(0, len(files), batch):
        images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in files[start : start + batch]])
        out += model(images).argmax(1).tolist()
    return out


@register("imagenette", ImagenetteSettings, "N images per Imagenette class, ResNet-50 ImageNet top-1 accuracy")
class Imagenette(Protocol):
    def judged_by_clip(self) -> bool:
        """The miniature world without a classifier file: its CLIP judge stands in for the ResNet-50."""
        return self.settings.classifier is None and profile_of(self.pipe).judge == "mini"

    def check(self) -> None:
        """The judge or the classifier, loaded once before any image."""
        if self.judged_by_clip():
            self.judge = checked_judge(self.pipe, self.settings)
        else:
            self.classifier = resnet50(self.settings.classifier)

    def samples(self):
        s = self.settings
        return [Sample(s.template.format(c), seed, None, {"class": c}) for c in s.classes
                for seed in range(s.images_per_class)]

    def predicted(self, files: list) -> list[str | None]:
        """Each image's class among the Imagenette ten (None: another ImageNet class)."""
        names = list(IMAGENET_INDEX)
        if self.judged_by_clip():
            judge = on_model(self.judge, self.pipe)
            return [names[i] for i in judge.classify(features(judge, files), names)]
        by_index = {i: name for name, i in IMAGENET_INDEX.items()}
        return [by_index.get(i) for i in resnet_top1(self.classifier, files)]

    def score(self, images: Images) -> dict:
        boot = Bootstrap(self.settings.bootstrap_samples, self.settings.bootstrap_seed)
        classes = [s.info["class"] for s in images.samples]
        per_class = {}
        for side, files in images.files.items():
            hits = [p == c for p, c in zip(self.predicted(files), classes)]
            for name in self.settings.classes:
                e = boot.mean([h for h, c in zip(hits, classes) if c == name])
                per_class.setdefault(name, {})[side] = {"value": e.value, "interval": e.interval(0.95)}
        classifier = (f"the miniature world's CLIP judge, zero-shot among the {len(IMAGENET_INDEX)} classes (no "
                      "ImageNet classifier reads its images)" if self.judged_by_clip() else
                      f"ResNet-50, ImageNet weights ({self.settings.classifier or 'torchvision IMAGENET1K_V1'})")
        return {"classifier": classifier, "classes": per_class, "images_per_class": self.settings.images_per_class}

    def markdown(self, metrics: dict) -> list[str]:
        def cell(v: dict) -> str:
            return f"{v['value']:.1%} [{v['interval'][0]:.1%}, {v['interval'][1]:.1%}]"

        lines = ["| class | top-1, original | top-1, erased |", "|---|---|---|"]
        lines += [f"| {name} | {cell(v['original'])} | {cell(v['erased'])} |" for name, v in metrics["classes"].items()]
        return [*lines, "", f"Top-1 accuracy of {metrics['images_per_class']} images a class (\"{self.settings.template}\","
                            f" seeds 0–{metrics['images_per_class'] - 1}) by {metrics['classifier']}; 95% bootstrap "
                            "intervals over the images."]
