"""The CLIP judge: zero-shot classification, CLIP score and image similarity with any open_clip model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import EraseError

MINI = "mini"


class Judge:
    """An open_clip-style model (encode_image / encode_text) with its preprocess and tokenizer."""

    def __init__(self, model, preprocess, tokenizer, name: str, pretrained: str | None) -> None:
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.name, self.pretrained = name, pretrained
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, name: str = MINI, pretrained: str | None = None, device: str = "cpu") -> "Judge":
        """'mini' (the miniature world's CLIP, offline) or an open_clip architecture and pretrained tag."""
        if name == MINI:
            from ..mini.clip import load_mini_clip

            return cls(*load_mini_clip(device=device), name=MINI, pretrained="erase mini world")
        cls.check(name, pretrained)
        import open_clip

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors for missing weights
            raise EraseError(f"CLIP {name} / {pretrained} could not be loaded ({exc}): put its weights in the local "
                             "cache, pass a local checkpoint file as pretrained, or use clip='mini'") from exc
        return cls(model, preprocess, open_clip.get_tokenizer(name), name=name, pretrained=pretrained)

    @staticmethod
    def check(name: str, pretrained: str | None) -> None:
        """Refuse an architecture open_clip lacks, or a local checkpoint that is not there, without importing
        open_clip (which takes seconds): from its shipped architecture configs."""
        if name == MINI or name.startswith(("hf-hub:", "local-dir:")):
            return
        spec = importlib.util.find_spec("open_clip")
        if spec is None:
            raise EraseError("open_clip is not installed: pip install open_clip_torch, or use clip='mini'")
        names = sorted(p.stem for p in (Path(spec.submodule_search_locations[0]) / "model_configs").glob("*.json"))
        if name not in names:
            raise EraseError(f"unknown CLIP model {name!r}: use 'mini' or one of open_clip's {', '.join(names)}")
        if pretrained and (Path(pretrained).suffix or "/" in pretrained) and not Path(pretrained).expanduser().is_file():
            raise EraseError(f"CLIP checkpoint {pretrained} does not exist: pass a local checkpoint file, "
                             "or a pretrained tag such as openai with its weights in the local cache")

    def describe(self) -> dict:
        return {"model": self.name, "pretrained": self.pretrained}

    def to(self, device) -> "Judge":
        """The judge on `device` (a protocol loads it on the CPU before any image, and scores on the model's)."""
        self.model.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        batch = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return self.model.encode_image(batch, normalize=True).float()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True).float()

    def classify(self, image_features: torch.Tensor, classes: list[str]) -> list[int]:
        """Index of the best-matching class text for each image."""
        return (image_features @ self.text_features(classes).T).argmax(dim=1).tolist()

    def clip_scores(self, image_features: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """100 · cos(image, text), pairwise (image i with text i), clamped at 0 as in the CLIP score."""
        return (100 * (image_features * self.text_features(texts)).sum(1)).clamp_min(0)
