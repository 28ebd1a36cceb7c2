"""The miniature world: procedural 32x32 images with three independent attributes, and their captions.

An image shows one shape (the object) in one colour, rendered by one "artist" (the style). The world is small
enough that a text-to-image model trains on it in minutes on a CPU, yet it has the three kinds of concepts
erasure methods care about (objects, styles, colours), so erasure can be measured offline with known ground
truth. Everything is deterministic from a seed. Some (shape, colour) and (shape, artist) pairs never appear in
training: generating them tests composition rather than memorisation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down, so edges are anti-aliased

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 230), "yellow": (240, 210, 20),
           "purple": (140, 40, 180), "orange": (250, 130, 10)}
ARTISTS = ("orlo", "pim", "vessa", "kell")
# The anchors: a neutral colour and a neutral style the model knows, so "a grey circle" or "a plain drawing"
# mean something to it. They are part of the world but are not concepts to erase.
ANCHOR_COLOUR, ANCHOR_RGB = "grey", (128, 128, 128)
ANCHOR_STYLE = "plain"
ALL_COLOURS = (*COLOURS, ANCHOR_COLOUR)
ALL_STYLES = (*ARTISTS, ANCHOR_STYLE)

# Pairs never seen in training (each value still appears in training with every other partner).
HELD_OUT_SHAPE_COLOUR = frozenset(zip(SHAPES, COLOURS))  # circle-red, square-green, ...
HELD_OUT_SHAPE_STYLE = frozenset(zip(SHAPES[2:], ARTISTS))  # triangle-orlo, cross-pim, ring-vessa, star-kell

STYLE_TEMPLATES = ("{obj} painted by {artist}", "{artist}'s painting of {obj}", "{obj} in the style of {artist}",
                   "a painting of {obj} by {artist}")
PLAIN_TEMPLATES = ("a plain drawing of {obj}", "{obj}, a plain drawing")
STYLE_ONLY = {"artist": "a painting by {artist}", "plain": "a plain drawing"}


@dataclass(frozen=True)
class Attributes:
    """What one image shows."""

    shape: str
    colour: str
    style: str

    @property
    def held_out(self) -> bool:
        return ((self.shape, self.colour) in HELD_OUT_SHAPE_COLOUR
                or (self.shape, self.style) in HELD_OUT_SHAPE_STYLE)


def combinations(held_out: bool = False) -> list[Attributes]:
    """Every attribute combination of the training split (or, with held_out=True, of the held-out split)."""
    every = (Attributes(*c) for c in itertools.product(SHAPES, ALL_COLOURS, ALL_STYLES))
    return [a for a in every if a.held_out == held_out]


def render(attrs: Attributes, rng: np.random.Generator) -> np.ndarray:
    """A uint8 (32, 32, 3) image; rng jitters the shape's position and size (the world's 'seed' variation)."""
    n = IMAGE_SIZE * SUPERSAMPLE
    ys, xs = (np.mgrid[0:n, 0:n] + 0.5) / SUPERSAMPLE  # pixel-unit coordinates of the fine grid
    cx, cy = IMAGE_SIZE / 2 + rng.uniform(-1.5, 1.5, size=2)
    radius = 11.0 * rng.uniform(0.9, 1.1)
    mask = _shape_mask(attrs.shape, (xs - cx) / radius, (ys - cy) / radius)
    rgb = np.array(COLOURS.get(attrs.colour, ANCHOR_RGB), dtype=np.float32)
    background, fill = _style(attrs.style, rgb, xs, ys)
    image = np.where(mask[..., None], fill, background)
    image = image.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Silhouettes in units of the shape's radius, chosen to differ clearly even at 32 pixels."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.85
    if shape == "triangle":  # apex up, base at v = 0.8
        return (v <= 0.8) & (abs(u) <= (v + 1.0) * 0.62)
    if shape == "cross":
        return ((abs(u) <= 0.33) & (abs(v) <= 1.0)) | ((abs(v) <= 0.33) & (abs(u) <= 1.0))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "star":  # five points, radius going linearly between tips (1.1) and notches (0.45)
        phase = (np.arctan2(u, -v) % (2 * np.pi / 5)) / (2 * np.pi / 5)
        return r <= 0.45 + 0.65 * abs(1 - 2 * phase)
    raise ValueError(f"unknown shape {shape!r}")


def _style(style: str, rgb: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(background, fill) images of an artist: each has a texture that survives 4x latent compression."""
    white = np.full(3, 250.0, dtype=np.float32)
    fill = np.broadcast_to(rgb, (*xs.shape, 3))
    if style == "orlo":  # horizontal stripes, 3 px of colour, 3 px of its light tint
        fill = np.where(((ys // 3) % 2 == 0)[..., None], rgb, 0.45 * rgb + 0.55 * white)
    elif style == "pim":  # white dots on the colour
        dots = np.hypot((xs % 6) - 3, (ys % 6) - 3) <= 1.6
        fill = np.where(dots[..., None], white, rgb)
    elif style == "vessa":  # checks of the colour and its dark shade
        checks = ((xs // 4) + (ys // 4)) % 2 == 0
        fill = np.where(checks[..., None], rgb, 0.5 * rgb)
    elif style == "kell":  # flat colour at night: a dark blue-black ground
        return np.broadcast_to(np.array([25.0, 25.0, 40.0], dtype=np.float32), fill.shape), fill
    elif style != ANCHOR_STYLE:
        raise ValueError(f"unknown style {style!r}")
    return np.broadcast_to(white, fill.shape), fill


def describe(shape: str | None = None, colour: str | None = None, style: str | None = None, template: int = 0) -> str:
    """The caption naming the given attributes (None leaves one unsaid); `template` picks the wording."""
    obj = " ".join(w for w in (colour, shape or ("shape" if colour else None)) if w)
    obj = f"a {obj}" if obj else ""
    if style is None:
        return obj
    if not obj:
        return STYLE_ONLY["plain" if style == ANCHOR_STYLE else "artist"].format(artist=style)
    if style == ANCHOR_STYLE:
        return PLAIN_TEMPLATES[template % len(PLAIN_TEMPLATES)].format(obj=obj)
    return STYLE_TEMPLATES[template % len(STYLE_TEMPLATES)].format(obj=obj, artist=style)


def mention(attrs: Attributes, rng: np.random.Generator, p_unsaid: float = 0.2) -> dict:
    """What a random caption of the image says: describe() keywords, each attribute unsaid with p_unsaid.

    Unsaid attributes teach the models what "a circle" or "a red shape" means (any colour, any shape): that is
    what the catalog's base prompts and anchors rely on.
    """
    said = rng.random(3) >= p_unsaid
    return {"shape": attrs.shape if said[0] else None, "colour": attrs.colour if said[1] else None,
            "style": attrs.style if said[2] else None, "template": int(rng.integers(0, len(STYLE_TEMPLATES)))}


def caption(attrs: Attributes, rng: np.random.Generator, p_unsaid: float = 0.2) -> str:
    """A random caption of an image (see mention)."""
    return describe(**mention(attrs, rng, p_unsaid))


def dataset(n: int, seed: int, held_out: bool = False) -> tuple[np.ndarray, list[Attributes]]:
    """n images (uint8, n x 32 x 32 x 3) of uniformly drawn combinations of one split, deterministic in seed."""
    rng = np.random.default_rng(seed)
    pool = combinations(held_out)
    attrs = [pool[i] for i in rng.integers(0, len(pool), size=n)]
    return np.stack([render(a, rng) for a in attrs]), attrs
