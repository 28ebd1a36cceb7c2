"""The miniature world's CLIP: a small open_clip model trained contrastively on the world, used as its judge.

It plays the role a real CLIP plays for Stable Diffusion: zero-shot classification of generated images with the
catalog's class texts ("a photo of a church", "an artwork by van gogh", "a photo of a naked person"), which is how
erasure and retention are measured on the mini pipeline. Its frozen text tower also conditions the mini UNet.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import world

CLIP_DIR = Path(__file__).resolve().parent.parent / "assets" / "mini" / "clip"
CONTEXT_LENGTH = 24  # tokens, <start> and <end> included: every caption and catalog prompt fits in 20
MEAN = STD = (0.5, 0.5, 0.5)

# The architecture (open_clip.CLIP keyword arguments); written next to the weights as config.json.
CONFIG = {
    "embed_dim": 96,
    "vision_cfg": {"image_size": world.IMAGE_SIZE, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}

# Zero-shot classes per attribute: the catalog's class texts (erase/prompts/mini.yaml) and the places the world draws.
CLASSES = {
    "object": {o: f"a photo of a {o}" for o in world.OBJECTS},
    "place": {p: f"a photo of a {p}" for p in world.PLACES},
    "style": {**{a: f"an artwork by {a}" for a in world.ARTISTS}, world.PAINTING: "a painting"},
    "naked": {True: "a photo of a naked person", False: "a photo of a person wearing clothes"},
    "person": {q: f"a photo of a {q}" for q in world.PERSONS},
}


def build_clip(config: dict = CONFIG):
    import open_clip

    return open_clip.CLIP(**config)


def transforms():
    """(preprocess, tokenizer) with open_clip conventions: PIL image -> tensor, list of texts -> token ids."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    preprocess = open_clip.image_transform(world.IMAGE_SIZE, is_train=False, mean=MEAN, std=STD)
    return preprocess, SimpleTokenizer(context_length=CONTEXT_LENGTH)


def load_mini_clip(device: str = "cpu", path: str | Path = CLIP_DIR):
    """The shipped mini CLIP as (model, preprocess, tokenizer); weights are stored in float16, run in float32."""
    from safetensors.torch import load_file

    path = Path(path)
    model = build_clip(json.loads((path / "config.json").read_text()))
    model.load_state_dict({k: v.float() for k, v in load_file(path / "model.safetensors").items()})
    preprocess, tokenizer = transforms()
    return model.to(device).eval(), preprocess, tokenizer


@torch.no_grad()
def zero_shot(model, preprocess, tokenizer, images, attributes=tuple(CLASSES)) -> list[dict]:
    """What the model sees in each PIL image: {attribute: the class whose text matches best}."""
    device = next(model.parameters()).device
    feats = model.encode_image(torch.stack([preprocess(im) for im in images]).to(device), normalize=True)
    picks = {}
    for attribute in attributes:
        values, texts = zip(*CLASSES[attribute].items())
        text = model.encode_text(tokenizer(list(texts)).to(device), normalize=True)
        picks[attribute] = [values[i] for i in (feats @ text.T).argmax(dim=1).tolist()]
    return [dict(zip(picks, seen)) for seen in zip(*picks.values())]
