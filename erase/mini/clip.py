"""The miniature world's CLIP: a small open_clip model trained contrastively on the world, used as its judge.

It plays the role a real CLIP plays for Stable Diffusion: zero-shot classification of generated images per
attribute (shape, colour, style), which is how erasure and retention are measured on the mini pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import world

CLIP_DIR = Path(__file__).resolve().parent.parent / "assets" / "mini" / "clip"
CONTEXT_LENGTH = 16
MEAN = STD = (0.5, 0.5, 0.5)

# The architecture (open_clip.CLIP keyword arguments); written next to the weights as config.json.
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": world.IMAGE_SIZE, "patch_size": 4, "width": 96, "layers": 3, "head_width": 32,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}

# Zero-shot classes per attribute, anchors included (an erased "red" may well turn grey).
CLASSES = {"shape": world.SHAPES, "colour": world.ALL_COLOURS, "style": world.ALL_STYLES}


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


def class_prompts(attribute: str) -> list[str]:
    """One caption per class that names only that attribute: "a circle", "a red shape", "a painting by orlo"."""
    return [world.describe(**{attribute: value}) for value in CLASSES[attribute]]


@torch.no_grad()
def zero_shot(model, preprocess, tokenizer, images) -> list[world.Attributes]:
    """The attributes the model sees in each PIL image (argmax over each attribute's class prompts)."""
    device = next(model.parameters()).device
    feats = model.encode_image(torch.stack([preprocess(im) for im in images]).to(device), normalize=True)
    picks = {}
    for attribute, classes in CLASSES.items():
        text = model.encode_text(tokenizer(class_prompts(attribute)).to(device), normalize=True)
        picks[attribute] = [classes[i] for i in (feats @ text.T).argmax(dim=1).tolist()]
    return [world.Attributes(*values) for values in zip(picks["shape"], picks["colour"], picks["style"])]
