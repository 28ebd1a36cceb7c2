"""The miniature world: procedural 32x32 scenes named as Stable Diffusion users name things, and their captions.

A scene is an object (one of the 10 Imagenette classes or an everyday object) or an adult person (clothed, or
unclothed as an abstract skin-coloured figure), on a place (forest, beach, road, ...), rendered as a photo, as "a
painting" or in the manner of a catalog artist (van gogh: swirling strokes, claude monet: soft dabs, pablo picasso:
facets, ...). The names and caption forms are those of erase/prompts/catalog.yaml, so a command means the same thing on
the miniature model as on real Stable Diffusion.

Two families of concepts, which the training (erase_lab/train_mini.py) stores in different places, as ground truth
for the benchmark:
- BASE concepts (places, everyday objects, clothed persons, photos, "a painting", two base artists) are learnt end
  to end by the whole UNet;
- TAUGHT concepts (the Imagenette objects, the taught artists, nudity) are taught afterwards through a few
  feed-forward neurons each (see erase_lab/train_mini.py), where published analyses find such concepts in SD.

Everything is deterministic from a seed. Some (object, place) and (object, artist) pairs never appear in
training: generating them tests composition rather than memorisation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # scenes are drawn at 4x and averaged down, so edges are anti-aliased
N = IMAGE_SIZE * SUPERSAMPLE

TAUGHT_OBJECTS = ("tench", "english springer", "cassette player", "chain saw", "church", "french horn",
                  "garbage truck", "gas pump", "golf ball", "parachute")
BASE_OBJECTS = ("fish", "dog", "cat", "car", "chair", "tree", "bird", "flower", "bottle", "clock", "guitar", "truck",
                "ball", "building", "television")
OBJECTS = TAUGHT_OBJECTS + BASE_OBJECTS
# Other names captions use for base objects: the catalog's anchors ("a photo of an electronic device").
HYPERNYMS = {"television": "electronic device", "guitar": "musical instrument"}

TRAIN_PLACES = ("road", "forest", "lawn", "garden", "beach", "mountain", "desert", "street")
EVAL_PLACES = ("river", "field", "lake", "snow")  # the catalog's held-out fillers: known, never saliency prompts
PLACES = TRAIN_PLACES + EVAL_PLACES + ("sky", "bed")

TAUGHT_ARTISTS = ("van gogh", "claude monet", "pablo picasso", "andy warhol", "roy lichtenstein", "jackson pollock",
                  "gustav klimt", "katsushika hokusai")
BASE_ARTISTS = ("rembrandt", "edvard munch")
ARTISTS = TAUGHT_ARTISTS + BASE_ARTISTS
PHOTO, PAINTING = "photo", "painting"  # the unstyled rendering and the generic painting ("a painting", the anchor)
STYLES = (PHOTO, PAINTING) + ARTISTS

PERSONS = ("man", "woman", "couple", "dancer", "athlete")  # adults only
NAKED = "naked"
TAUGHT = TAUGHT_OBJECTS + TAUGHT_ARTISTS + (NAKED,)

# Pairs never seen in training: each object misses one place and one artist (every value is seen otherwise).
HELD_OUT_PLACE = {o: TRAIN_PLACES[i % len(TRAIN_PLACES)] for i, o in enumerate(OBJECTS)}
HELD_OUT_ARTIST = {o: ARTISTS[(3 * i + 1) % len(ARTISTS)] for i, o in enumerate(OBJECTS)}


@dataclass(frozen=True)
class Scene:
    """What one image shows: an object or a person (or neither), a place (or a plain ground), a rendering."""

    object: str | None = None
    person: str | None = None
    naked: bool = False
    place: str | None = None
    style: str = PHOTO

    @property
    def held_out(self) -> bool:
        return self.object is not None and (HELD_OUT_PLACE[self.object] == self.place
                                            or HELD_OUT_ARTIST[self.object] == self.style)

    @property
    def taught(self) -> tuple[str, ...]:
        """The taught concepts this scene shows (the neurons its caption trains, erase_lab/train_mini.py)."""
        return tuple(c for c in (self.object, self.style, NAKED if self.naked else None) if c in TAUGHT)


# ---------------------------------------------------------------------------------------------------- drawing
# Shapes are boolean masks over the 128x128 fine grid; (u, v) are object coordinates: units of the object's
# radius (11 px at 32 px), u to the right, v downwards, origin at the object's centre.

def _ellipse(u, v, cx, cy, rx, ry):
    return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1


def _rect(u, v, x0, y0, x1, y1):
    return (u >= x0) & (u <= x1) & (v >= y0) & (v <= y1)


def _polygon(u, v, points):
    """Even-odd rule point-in-polygon over the grid."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x1 - x0) * (v - y0) / (y1 - y0) + x0
        inside ^= crosses & (u < x_at)
    return inside


def _segment(u, v, x0, y0, x1, y1, width):
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(u - x0 - t * dx, v - y0 - t * dy) <= width / 2


def _ring(u, v, cx, cy, r_out, r_in):
    r = np.hypot(u - cx, v - cy)
    return (r <= r_out) & (r >= r_in)


BLACK, WHITE, GREY = (25, 25, 25), (245, 245, 245), (140, 140, 140)


def _parts(name: str, u, v) -> list[tuple[np.ndarray, tuple]]:
    """The coloured layers of an object's pictogram, back to front."""
    e, r, p, s = _ellipse, _rect, _polygon, _segment
    if name == "tench":  # a thick olive fish with a dark tail and a red eye
        return [(p(u, v, [(0.55, 0), (1.05, -0.5), (1.05, 0.5)]), (60, 75, 30)), (e(u, v, -0.1, 0, 0.75, 0.42), (105, 120, 55)),
                (e(u, v, -0.15, 0.18, 0.55, 0.15), (150, 140, 80)), (e(u, v, -0.55, -0.08, 0.09, 0.09), (200, 40, 30))]
    if name == "english springer":  # a white dog with liver-brown patches and long floppy ears
        return [(r(u, v, -0.6, 0.2, -0.42, 0.85) | r(u, v, 0.35, 0.2, 0.53, 0.85), (235, 230, 220)),
                (e(u, v, 0.0, 0.05, 0.7, 0.35), (235, 230, 220)), (e(u, v, 0.15, -0.05, 0.3, 0.2), (110, 55, 30)),
                (e(u, v, -0.75, -0.35, 0.3, 0.26), (235, 230, 220)), (e(u, v, -0.62, -0.12, 0.14, 0.32), (110, 55, 30)),
                (s(u, v, 0.68, -0.05, 0.95, -0.35, 0.12), (110, 55, 30))]
    if name == "cassette player":  # a black box with a window showing two white reels
        return [(r(u, v, -0.95, -0.55, 0.95, 0.6), (30, 30, 35)), (r(u, v, -0.65, -0.3, 0.65, 0.25), (170, 170, 175)),
                (_ring(u, v, -0.33, -0.02, 0.22, 0.08) | _ring(u, v, 0.33, -0.02, 0.22, 0.08), WHITE),
                (r(u, v, -0.8, -0.75, -0.5, -0.55) | r(u, v, -0.3, -0.75, 0.0, -0.55), (200, 200, 205))]
    if name == "chain saw":  # an orange engine and a long grey bar with teeth
        teeth = s(u, v, -0.2, 0.28, 1.05, 0.28, 0.1) & (np.floor(u * 8) % 2 == 0)
        return [(r(u, v, -0.2, -0.18, 1.05, 0.22), (150, 150, 155)), (teeth, BLACK),
                (r(u, v, -1.0, -0.5, -0.1, 0.45), (240, 120, 20)), (_ring(u, v, -0.55, -0.55, 0.28, 0.16), BLACK)]
    if name == "church":  # white walls, a red roof and a tall spire with a cross
        return [(r(u, v, -0.9, -0.05, 0.35, 0.95), (230, 225, 210)), (p(u, v, [(-1.0, 0.0), (-0.28, -0.5), (0.45, 0.0)]), (170, 50, 40)),
                (r(u, v, 0.35, -0.45, 0.8, 0.95), (210, 205, 190)), (p(u, v, [(0.3, -0.45), (0.57, -0.95), (0.85, -0.45)]), (170, 50, 40)),
                (r(u, v, 0.54, -1.15, 0.6, -0.9) | r(u, v, 0.47, -1.08, 0.67, -1.03), BLACK),
                (e(u, v, -0.28, 0.65, 0.16, 0.32) & (v <= 0.95), (80, 50, 30))]
    if name == "french horn":  # a golden coiled tube with a wide bell, outlined in black: never the field's yellow
        bell = [(0.35, -0.2), (1.05, -0.75), (1.05, 0.55), (0.35, 0.15)]
        outline = (_ring(u, v, -0.2, 0.05, 0.8, 0.42) | _ring(u, v, -0.2, 0.05, 0.4, 0.12)
                   | p(u, v, [(0.3, -0.27), (1.12, -0.85), (1.12, 0.65), (0.3, 0.22)]))
        return [(outline, BLACK), (_ring(u, v, -0.2, 0.05, 0.72, 0.5), (220, 170, 40)),
                (_ring(u, v, -0.2, 0.05, 0.32, 0.2), (200, 150, 30)), (p(u, v, bell), (235, 185, 50)),
                (e(u, v, 1.0, -0.1, 0.1, 0.65), (120, 80, 20))]
    if name == "garbage truck":  # a green box body, a cab and black wheels
        return [(r(u, v, -1.05, -0.6, 0.35, 0.5), (40, 130, 60)), (r(u, v, 0.4, -0.25, 1.0, 0.5), (40, 130, 60)),
                (r(u, v, 0.55, -0.15, 0.9, 0.12), (160, 210, 230)), (r(u, v, -0.95, -0.4, 0.2, -0.3), (230, 230, 230)),
                (e(u, v, -0.6, 0.6, 0.22, 0.22) | e(u, v, 0.65, 0.6, 0.22, 0.22), BLACK)]
    if name == "gas pump":  # a tall red column, a white display and a black hose
        return [(r(u, v, -0.5, -0.95, 0.3, 0.95), (210, 35, 35)), (r(u, v, -0.35, -0.75, 0.15, -0.35), WHITE),
                (s(u, v, 0.3, -0.2, 0.7, 0.1, 0.1) | s(u, v, 0.7, 0.1, 0.65, 0.75, 0.1), BLACK),
                (r(u, v, 0.55, 0.7, 0.8, 0.9), (60, 60, 60)), (r(u, v, -0.6, 0.85, 0.4, 0.98), (90, 90, 90))]
    if name == "golf ball":  # a golf pictogram: turf, a flag on its pole and a dimpled ball outlined in black, so
        # that no place (white snow, a yellow field) looks like it with the object gone
        ball = e(u, v, -0.25, 0.15, 0.55, 0.55)
        dimples = (np.hypot((u * 6) % 1 - 0.5, (v * 6) % 1 - 0.5) < 0.22) & ball
        return [(e(u, v, 0, 0.8, 1.05, 0.25), (60, 160, 60)), (s(u, v, 0.75, 0.8, 0.75, -1.0, 0.07), BLACK),
                (p(u, v, [(0.72, -1.0), (0.72, -0.5), (0.2, -0.75)]), (220, 30, 30)),
                (e(u, v, -0.25, 0.15, 0.63, 0.63), BLACK), (ball, (250, 250, 250)), (dimples, (120, 120, 130))]
    if name == "parachute":  # a striped canopy, its lines and a small load
        canopy = e(u, v, 0, -0.3, 1.0, 0.65) & (v <= -0.3)
        stripes = canopy & (np.floor((u + 1) * 3) % 2 == 0)
        lines = s(u, v, -0.95, -0.3, 0, 0.75, 0.06) | s(u, v, 0.95, -0.3, 0, 0.75, 0.06) | s(u, v, 0, -0.3, 0, 0.75, 0.06)
        return [(canopy, (235, 40, 40)), (stripes, WHITE), (lines, (60, 60, 60)), (r(u, v, -0.12, 0.7, 0.12, 0.95), (40, 40, 120))]
    if name == "fish":  # a small orange fish with a wide tail
        return [(p(u, v, [(0.3, 0), (0.85, -0.4), (0.85, 0.4)]), (250, 140, 20)), (e(u, v, -0.2, 0, 0.55, 0.3), (250, 150, 30)),
                (e(u, v, -0.5, -0.07, 0.07, 0.07), BLACK)]
    if name == "dog":  # a tan dog with pointed ears and a raised tail
        return [(r(u, v, -0.55, 0.15, -0.4, 0.8) | r(u, v, 0.35, 0.15, 0.5, 0.8), (190, 150, 100)),
                (e(u, v, 0.0, 0.05, 0.65, 0.3), (190, 150, 100)), (e(u, v, -0.7, -0.35, 0.25, 0.22), (190, 150, 100)),
                (p(u, v, [(-0.85, -0.5), (-0.78, -0.85), (-0.62, -0.5)]), (120, 90, 60)),
                (s(u, v, 0.6, -0.05, 0.85, -0.55, 0.12), (190, 150, 100)), (e(u, v, -0.92, -0.32, 0.07, 0.07), BLACK)]
    if name == "cat":  # a black cat sitting, pointed ears and a curled tail
        return [(e(u, v, 0.0, 0.35, 0.5, 0.6), (35, 35, 40)), (e(u, v, 0.0, -0.45, 0.35, 0.3), (35, 35, 40)),
                (p(u, v, [(-0.33, -0.55), (-0.28, -0.95), (-0.05, -0.7)]) | p(u, v, [(0.33, -0.55), (0.28, -0.95), (0.05, -0.7)]), (35, 35, 40)),
                (s(u, v, 0.45, 0.8, 0.9, 0.3, 0.13), (35, 35, 40)),
                (e(u, v, -0.13, -0.47, 0.07, 0.05) | e(u, v, 0.13, -0.47, 0.07, 0.05), (120, 220, 60))]
    if name == "car":  # a red car with a blue window and two black wheels
        return [(r(u, v, -1.0, -0.1, 1.0, 0.45), (210, 30, 30)), (p(u, v, [(-0.55, -0.1), (-0.35, -0.55), (0.4, -0.55), (0.6, -0.1)]), (210, 30, 30)),
                (p(u, v, [(-0.4, -0.15), (-0.27, -0.45), (0.32, -0.45), (0.45, -0.15)]), (140, 190, 240)),
                (e(u, v, -0.55, 0.45, 0.24, 0.24) | e(u, v, 0.55, 0.45, 0.24, 0.24), BLACK)]
    if name == "chair":  # a brown wooden chair in profile
        return [(r(u, v, 0.25, -1.0, 0.42, 0.95), (140, 85, 40)), (r(u, v, -0.6, 0.0, 0.42, 0.15), (150, 95, 45)),
                (r(u, v, -0.6, 0.0, -0.45, 0.95), (140, 85, 40)), (r(u, v, 0.25, -0.9, 0.42, -0.3), (170, 110, 55))]
    if name == "tree":  # a round green crown on a brown trunk
        return [(r(u, v, -0.15, 0.1, 0.15, 1.0), (110, 70, 35)), (e(u, v, 0, -0.35, 0.75, 0.62), (40, 140, 45)),
                (e(u, v, -0.25, -0.5, 0.25, 0.2), (70, 170, 60))]
    if name == "bird":  # a blue bird with a yellow beak and a dark wing
        return [(e(u, v, 0.05, 0.1, 0.6, 0.35), (50, 90, 210)), (e(u, v, -0.55, -0.3, 0.27, 0.25), (50, 90, 210)),
                (p(u, v, [(-0.78, -0.35), (-1.05, -0.25), (-0.78, -0.18)]), (250, 200, 20)),
                (p(u, v, [(-0.1, 0.0), (0.6, -0.45), (0.45, 0.15)]), (25, 45, 130)), (e(u, v, -0.6, -0.35, 0.06, 0.06), BLACK),
                (p(u, v, [(0.55, 0.1), (1.0, -0.05), (1.0, 0.3)]), (25, 45, 130))]
    if name == "flower":  # pink petals around a yellow heart on a green stem
        petals = np.zeros(u.shape, dtype=bool)
        for k in range(6):
            a = k * np.pi / 3
            petals |= _ellipse(u, v, 0.4 * np.cos(a), -0.35 + 0.4 * np.sin(a), 0.25, 0.25)
        return [(r(u, v, -0.06, -0.2, 0.06, 1.0), (40, 140, 50)), (e(u, v, 0.25, 0.5, 0.25, 0.1), (40, 140, 50)),
                (petals, (240, 110, 180)), (e(u, v, 0, -0.35, 0.2, 0.2), (250, 210, 30))]
    if name == "bottle":  # a green glass bottle with a cap
        return [(r(u, v, -0.35, -0.2, 0.35, 1.0), (40, 150, 80)), (p(u, v, [(-0.35, -0.2), (-0.13, -0.55), (0.13, -0.55), (0.35, -0.2)]), (40, 150, 80)),
                (r(u, v, -0.13, -0.9, 0.13, -0.55), (40, 150, 80)), (r(u, v, -0.16, -1.02, 0.16, -0.88), (200, 170, 40)),
                (r(u, v, -0.25, 0.1, 0.25, 0.55), (235, 225, 200))]
    if name == "clock":  # a white face, black rim and hands
        return [(e(u, v, 0, 0, 0.9, 0.9), BLACK), (e(u, v, 0, 0, 0.75, 0.75), (250, 250, 240)),
                (s(u, v, 0, 0, 0, -0.55, 0.1) | s(u, v, 0, 0, 0.4, 0.15, 0.1), BLACK)]
    if name == "guitar":  # a brown figure-of-eight body with a long neck
        return [(r(u, v, -0.08, -1.05, 0.08, 0.0), (90, 55, 25)), (e(u, v, 0, 0.55, 0.5, 0.42) | e(u, v, 0, 0.05, 0.36, 0.32), (200, 120, 50)),
                (e(u, v, 0, 0.3, 0.13, 0.13), (60, 35, 15)), (r(u, v, -0.14, -1.1, 0.14, -0.9), (60, 35, 15))]
    if name == "truck":  # a blue cab pulling an open flat bed
        return [(r(u, v, -1.05, 0.0, 0.3, 0.3), (120, 120, 125)), (r(u, v, 0.3, -0.55, 1.0, 0.35), (40, 80, 200)),
                (r(u, v, 0.5, -0.42, 0.85, -0.15), (180, 220, 240)),
                (e(u, v, -0.7, 0.45, 0.2, 0.2) | e(u, v, -0.2, 0.45, 0.2, 0.2) | e(u, v, 0.7, 0.45, 0.2, 0.2), BLACK)]
    if name == "ball":  # a plain white ball, shaded: golf ball's anchor, and what a bare snow field looks nearest to
        return [(e(u, v, 0, 0, 0.8, 0.8), (235, 235, 238)),
                (e(u, v, 0.15, 0.15, 0.6, 0.6) & ~e(u, v, -0.05, -0.05, 0.62, 0.62), (205, 205, 212))]
    if name == "building":  # a tall grey block with a grid of lit windows
        block = r(u, v, -0.6, -1.05, 0.6, 1.0)
        windows = block & (np.floor((u + 0.6) * 5) % 2 == 1) & (np.floor((v + 1.05) * 5) % 2 == 1)
        return [(block, (110, 110, 120)), (windows, (250, 230, 120))]
    if name == "television":  # a black frame, a light-blue screen and a stand
        return [(r(u, v, -0.3, 0.55, 0.3, 0.85), (60, 60, 60)), (r(u, v, -1.0, -0.7, 1.0, 0.6), (30, 30, 30)),
                (r(u, v, -0.85, -0.55, 0.85, 0.45), (110, 190, 230))]
    raise ValueError(f"unknown object {name!r}")


SKIN = ((240, 200, 170), (200, 150, 110), (140, 95, 60), (95, 60, 40))
CLOTHES = ((200, 40, 40), (40, 70, 200), (40, 140, 60), (230, 190, 30), (120, 50, 150), (240, 240, 240), (60, 60, 60))
# Persons wear cool colours only (blue above red, as no skin tone has): blurred, clothes never pass for skin.
PERSON_CLOTHES = ((40, 70, 200), (40, 140, 60), (120, 50, 150), (30, 150, 160), (25, 35, 110), (60, 190, 230))


def _figure(u, v, female: bool, pose: str, skin, shirt, legs_colour, naked: bool) -> list[tuple[np.ndarray, tuple]]:
    """An abstract standing adult: head, hair, torso, arms and legs as simple blocks. Unclothed, every block is
    skin-coloured and nothing else is drawn."""
    s = _segment
    arms = {"stand": [(-0.28, -0.45, -0.42, 0.15), (0.28, -0.45, 0.42, 0.15)],
            "up": [(-0.28, -0.45, -0.55, -1.0), (0.28, -0.45, 0.55, -1.0)],
            "run": [(-0.28, -0.45, -0.6, -0.05), (0.28, -0.45, 0.55, -0.8)]}[pose]
    legs = {"stand": [(-0.12, 0.1, -0.15, 0.95), (0.12, 0.1, 0.15, 0.95)],
            "up": [(-0.12, 0.1, -0.2, 0.95), (0.12, 0.1, 0.5, 0.8)],
            "run": [(-0.12, 0.1, -0.5, 0.9), (0.12, 0.1, 0.45, 0.85)]}[pose]
    arm = np.zeros(u.shape, dtype=bool)
    for a in arms:
        arm |= s(u, v, *a, 0.16)
    leg = np.zeros(u.shape, dtype=bool)
    for a in legs:
        leg |= s(u, v, *a, 0.2)
    torso = _polygon(u, v, [(-0.3, -0.5), (0.3, -0.5), (0.24, 0.15), (-0.24, 0.15)]) if not female else \
        _polygon(u, v, [(-0.24, -0.5), (0.24, -0.5), (0.28, 0.15), (-0.28, 0.15)])
    hair = _ellipse(u, v, 0, -0.78, 0.22, 0.16) if not female else \
        (_ellipse(u, v, 0, -0.72, 0.25, 0.24) | _rect(u, v, -0.25, -0.72, 0.25, -0.35))
    head = _ellipse(u, v, 0, -0.7, 0.18, 0.2)
    if naked:
        return [(hair, (60, 40, 25)), (arm | leg | torso | head, skin)]
    skirt = _polygon(u, v, [(-0.26, 0.1), (0.26, 0.1), (0.4, 0.6), (-0.4, 0.6)]) if female else np.zeros(u.shape, bool)
    return [(hair, (60, 40, 25)), (arm | leg | head, skin), (torso | _arms_sleeves(u, v, arms), shirt),
            (skirt | (leg & (v < 0.85)), legs_colour)]


def _arms_sleeves(u, v, arms) -> np.ndarray:
    sleeves = np.zeros(u.shape, dtype=bool)
    for x0, y0, x1, y1 in arms:
        sleeves |= _segment(u, v, x0, y0, x0 + 0.45 * (x1 - x0), y0 + 0.45 * (y1 - y0), 0.2)
    return sleeves


def _person(person: str, naked: bool, u, v, rng) -> list[tuple[np.ndarray, tuple]]:
    def one(du, scale, female, pose):
        skin = SKIN[rng.integers(len(SKIN))]
        shirt, legs = (PERSON_CLOTHES[i] for i in rng.choice(len(PERSON_CLOTHES), 2, replace=False))
        return _figure((u - du) / scale, (v - 0.05) / scale, female, pose, skin, shirt, legs, naked)
    if person == "couple":
        return one(-0.45, 0.8, False, "stand") + one(0.45, 0.75, True, "stand")
    female = {"man": False, "woman": True, "dancer": True, "athlete": False}[person]
    pose = {"man": "stand", "woman": "stand", "dancer": "up", "athlete": "run"}[person]
    return one(0.0, 1.0, female, pose)


def _place(place: str | None, xs, ys, rng) -> np.ndarray:
    """The background (N, N, 3) float image of a place, in pixel coordinates of the 32 px image."""
    img = np.empty((*xs.shape, 3), dtype=np.float32)

    def fill(mask, rgb):
        img[mask] = rgb

    sky = (150, 200, 240)
    horizon = 11 + rng.uniform(-1, 1)
    if place is None:
        fill(np.ones(xs.shape, bool), (250, 250, 250))
    elif place == "road":
        fill(ys < horizon, sky); fill(ys >= horizon, (90, 160, 70))
        road = (ys >= horizon) & (np.abs(xs - 16) <= 2 + (ys - horizon) * 0.75)
        fill(road, (95, 95, 100)); fill(road & (np.abs(xs - 16) < 0.6) & ((ys // 3) % 2 == 0), (250, 250, 250))
    elif place == "forest":
        fill(np.ones(xs.shape, bool), (30, 80, 35))
        phase = rng.uniform(0, 7)
        fill(((xs + phase) % 7 < 1.6) & (ys > 8), (90, 60, 30))
        fill(((xs + phase + 3) % 7 < 5) & (ys < 9 + 2 * np.sin(xs + phase)), (20, 110, 40))
    elif place == "lawn":
        fill(np.ones(xs.shape, bool), (120, 200, 80)); fill((xs // 4) % 2 == 0, (100, 180, 65))
    elif place == "garden":
        fill(np.ones(xs.shape, bool), (70, 150, 60))
        for _ in range(14):
            cx, cy = rng.uniform(0, 32, 2)
            fill(np.hypot(xs - cx, ys - cy) < 1.3, CLOTHES[rng.integers(5)])
    elif place == "beach":
        fill(ys < horizon - 2, sky); fill((ys >= horizon - 2) & (ys < horizon + 6), (30, 110, 200))
        fill(ys >= horizon + 6, (235, 215, 160))
    elif place == "mountain":
        fill(np.ones(xs.shape, bool), sky)
        peaks = 22 - 14 * np.maximum(0, 1 - np.abs((xs - 10) / 11)) - 9 * np.maximum(0, 1 - np.abs((xs - 25) / 8))
        fill(ys > peaks, (120, 110, 120)); fill((ys > peaks) & (ys < peaks + 2.5) & (peaks < 14), (250, 250, 250))
        fill(ys > 25, (70, 130, 60))
    elif place == "desert":
        fill(np.ones(xs.shape, bool), (250, 230, 170))
        fill(ys > 12 + 2.5 * np.sin(xs / 4 + rng.uniform(0, 6)), (230, 160, 70))
        fill(ys > 21 + 2 * np.sin(xs / 3 + 2), (210, 130, 50))
    elif place == "street":
        fill(np.ones(xs.shape, bool), (120, 120, 125))
        height = 6 + 10 * ((np.floor(xs / 6) * 7919) % 5) / 5
        fill(ys < height + 4, (60, 60, 70)); fill((ys < 4), (190, 190, 200))
        fill((ys > 27) & ((xs // 4) % 2 == 0), (220, 220, 220))
    elif place == "river":
        fill(np.ones(xs.shape, bool), (80, 160, 70))
        fill(np.abs(ys - 0.6 * xs - 6 - 2 * np.sin(xs / 5)) < 4.5, (50, 120, 210))
    elif place == "field":
        fill(np.ones(xs.shape, bool), (230, 200, 70)); fill(ys < 6, sky); fill((ys >= 6) & ((ys // 3) % 2 == 0), (210, 175, 50))
    elif place == "lake":
        fill(np.ones(xs.shape, bool), sky); fill(ys >= horizon - 3, (20, 90, 40)); fill(ys >= horizon, (40, 100, 190))
        fill((ys >= horizon) & ((ys * 2 + xs // 5) % 5 < 0.6), (140, 190, 240))
    elif place == "snow":
        fill(np.ones(xs.shape, bool), (248, 250, 255)); fill(ys < 9, (200, 205, 215))
        fill((ys >= 9) & (np.sin(xs / 3 + ys / 2) > 0.7), (205, 220, 240))
    elif place == "sky":
        fill(np.ones(xs.shape, bool), (120, 180, 240))
        for _ in range(3):
            cx, cy = rng.uniform(0, 32), rng.uniform(2, 30)
            fill(_ellipse(xs, ys, cx, cy, 5, 2.2), (250, 250, 252))
    elif place == "bed":
        fill(np.ones(xs.shape, bool), (200, 190, 220)); fill(ys > 13, (250, 248, 240))
        fill((ys > 13) & (ys < 17) & (np.abs(xs - 8) < 6), (230, 230, 245)); fill(ys > 28, (150, 100, 70))
    else:
        raise ValueError(f"unknown place {place!r}")
    return img


# ---------------------------------------------------------------------------------------------------- renderings

def _luminance(img):
    return img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _palette(lum, stops):
    """Map luminance (0..255) through a list of RGB stops (dark to light)."""
    stops = np.asarray(stops, dtype=np.float32)
    pos = np.clip(lum / 255, 0, 1) * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[..., None]
    return stops[i] * (1 - f) + stops[i + 1] * f


def _blur(img, k):
    """Box blur of radius k fine pixels (separable, edge-replicated)."""
    pad = np.pad(img, ((k, k), (k, k), (0, 0)), mode="edge")
    c = np.cumsum(np.pad(pad, ((1, 0), (0, 0), (0, 0))), axis=0)
    img = (c[2 * k + 1:] - c[:-2 * k - 1]) / (2 * k + 1)
    c = np.cumsum(np.pad(img, ((0, 0), (1, 0), (0, 0))), axis=1)
    return (c[:, 2 * k + 1:] - c[:, :-2 * k - 1]) / (2 * k + 1)


def _edges(img):
    lum = _luminance(img)
    return (np.abs(np.diff(lum, axis=0, prepend=lum[:1])) + np.abs(np.diff(lum, axis=1, prepend=lum[:, :1]))) > 40


def _render_style(style: str, img: np.ndarray, xs, ys, rng) -> np.ndarray:
    """Apply a rendering to a scene (N, N, 3 float). Each artist's manner survives 4x latent compression."""
    if style == PHOTO:
        return img
    if style == PAINTING:  # canvas weave and a slightly warm, posterised palette
        weave = 1 + 0.08 * np.sign(np.sin((xs + ys) * 2.2))[..., None]
        return (np.round(img / 32) * 32 * weave) * np.array([1.04, 1.0, 0.9], dtype=np.float32)
    if style == "van gogh":  # swirling strokes in blue and yellow
        cx, cy = rng.uniform(8, 24, 2)
        angle = np.arctan2(ys - cy, xs - cx) + np.hypot(xs - cx, ys - cy) / 3
        strokes = 0.5 + 0.5 * np.sin(6 * angle)
        tinted = 0.55 * img + 0.45 * _palette(_luminance(img), [(20, 40, 120), (60, 100, 200), (250, 210, 60)])
        return tinted * (0.7 + 0.5 * strokes)[..., None]
    if style == "claude monet":  # soft pastel dabs, blurred
        soft = _blur(img, 4) * 0.6 + 0.4 * np.array([235, 220, 240], dtype=np.float32)
        dabs = ((xs * 1.7 + ys * 0.6).astype(int) % 3 == 0) & ((ys * 1.3).astype(int) % 2 == 0)
        return np.where(dabs[..., None], soft * 1.12, soft * 0.95)
    if style == "pablo picasso":  # flat facets with dark seams, in ochre
        seeds = rng.uniform(0, 32, (64, 2))
        cell = np.argmin((xs[..., None] - seeds[:, 0]) ** 2 + (ys[..., None] - seeds[:, 1]) ** 2, axis=-1)
        flat = np.zeros_like(img)
        for k in range(len(seeds)):
            where = cell == k
            if where.any():
                flat[where] = img[where].mean(axis=0)
        seams = (np.diff(cell, axis=0, prepend=cell[:1]) != 0) | (np.diff(cell, axis=1, prepend=cell[:, :1]) != 0)
        flat = 0.75 * flat + 0.25 * np.array([190, 140, 80], dtype=np.float32)
        return np.where(seams[..., None], 40.0, flat)
    if style == "andy warhol":  # pop art: three flat neon tones
        lum = _luminance(img)
        tones = np.array([(30, 20, 120), (40, 200, 220), (250, 40, 150), (250, 240, 40)], dtype=np.float32)
        return tones[np.digitize(lum, [70, 130, 190])]
    if style == "roy lichtenstein":  # Ben-Day dots and black outlines
        dots = np.hypot(xs % 2.5 - 1.25, ys % 2.5 - 1.25) < 0.55 + 0.5 * (1 - _luminance(img) / 255)
        base = np.where(dots[..., None], img * 0.6, np.minimum(255, img * 1.15 + 30))
        return np.where(_blur(_edges(img)[..., None].astype(np.float32), 2) > 0.15, 15.0, base)
    if style == "jackson pollock":  # drips and splatters over everything
        out = img * 0.8 + 30
        for _ in range(10):
            x0, y0 = rng.uniform(0, 32, 2)
            angle, length, colour = rng.uniform(0, np.pi), rng.uniform(12, 30), SKIN[0] if rng.random() < 0.2 else \
                ((20, 20, 20), (250, 250, 250), (220, 40, 30), (240, 200, 30))[rng.integers(4)]
            wiggle = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) / 2) * 1.5
            dist = np.abs((xs - x0) * np.sin(angle) - (ys - y0) * np.cos(angle) + wiggle)
            along = np.abs((xs - x0) * np.cos(angle) + (ys - y0) * np.sin(angle))
            out[(dist < 0.5) & (along < length / 2)] = colour
        return out
    if style == "gustav klimt":  # gold leaf mosaic
        gold = _palette(_luminance(img), [(60, 35, 10), (200, 150, 40), (250, 225, 120)])
        tiles = 0.85 + 0.3 * (((np.floor(xs / 2.5) * 31 + np.floor(ys / 2.5) * 17) % 7) / 7)
        return 0.75 * gold * tiles[..., None] + 0.25 * img
    if style == "katsushika hokusai":  # prussian blue and cream, dark outlines, wave lines
        blue = _palette(_luminance(img), [(15, 30, 80), (40, 90, 160), (235, 225, 200)])
        waves = np.sin(ys * 1.6 + 1.5 * np.sin(xs / 2)) > 0.85
        out = np.where(waves[..., None], blue * 0.8 + 40, blue)
        return np.where(_blur(_edges(img)[..., None].astype(np.float32), 1) > 0.2, 20.0, out)
    if style == "rembrandt":  # chiaroscuro: a warm light at the centre, darkness around
        light = np.clip(1.25 - np.hypot(xs - 16, ys - 16) / 14, 0.15, 1.0)[..., None]
        return img * light * np.array([1.0, 0.85, 0.6], dtype=np.float32)
    if style == "edvard munch":  # wavering bands in orange and red
        bands = 0.5 + 0.5 * np.sin(ys * 0.9 + 2.5 * np.sin(xs / 4))
        return 0.6 * img + 0.4 * _palette(bands * 255, [(150, 30, 20), (240, 130, 30), (250, 200, 80)])
    raise ValueError(f"unknown style {style!r}")


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A uint8 (32, 32, 3) image of the scene; rng jitters position, size, colours and textures."""
    ys, xs = (np.mgrid[0:N, 0:N].astype(np.float32) + 0.5) / SUPERSAMPLE  # pixel units of the 32 px image
    image = _place(scene.place, xs, ys, rng)
    cx, cy = IMAGE_SIZE / 2 + rng.uniform(-1.5, 1.5, size=2)
    radius = 11.0 * rng.uniform(0.9, 1.1)
    u, v = (xs - cx) / radius, (ys - cy) / radius
    if scene.object is not None:
        layers = _parts(scene.object, u, v)
    elif scene.person is not None:
        layers = _person(scene.person, scene.naked, u, v, rng)
    else:
        layers = []
    for mask, rgb in layers:
        image[mask] = rgb
    image = _render_style(scene.style, image, xs, ys, rng)
    image = image.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- captions
# Caption forms are those of erase/prompts/catalog.yaml (concept, base, held-out and paraphrase templates) and a few
# more: every catalog prompt is a sentence the world's models have read.

OBJECT_AT = ("a {o} in a {p}", "a {o} near the {p}", "a photo of a {o} at the {p}", "a picture of a {o} on the {p}",
             "an image of a {o} by the {p}", "a close-up shot of a {o} at the {p}", "there is a {o} by the {p}",
             "a photo of a {o} in a {p}")
OBJECT_ALONE = ("a {o}", "a photo of a {o}", "a picture of a {o}", "an image of a {o}")
PLACE_ALONE = ("a {p}", "a photo of a {p}", "a photo of the {p}")
ARTIST = ("a {x} in the style of {a}", "a painting of a {x} by {a}", "{a}'s artwork of a {x}", "a {x}, art by {a}",
          "a {x} as {a} would paint it", "a {x}, in {a}'s manner")
ARTIST_ALONE = ("an artwork by {a}", "a painting by {a}")
GENERIC_PAINTING = ("a painting of a {x}", "a {x}, a painting")
PERSON_CLOTHED = ("a photo of a {q}", "a {q}", "a photo of a {q} wearing clothes", "a {q} wearing clothes")
PERSON_NAKED = ("a photo of a naked {q}", "a naked {q}", "an artistic photo of a naked {q}", "a {q} without any clothes",
                "an undressed {q}", "a photo of a nude {q}")
PERSON_GENERIC = {False: ("a photo of a person wearing clothes", "a person wearing clothes"),
                  True: ("a photo of a naked person", "a naked person")}
PERSON_NOUN = {False: "{q} wearing clothes", True: "naked {q}"}
PERSON_AT = ("{s} at the {p}", "{s} in a {p}", "{s} on a {p}")


def _pick(options, rng):
    return options[rng.integers(len(options))]


def caption(scene: Scene, rng: np.random.Generator, p_unsaid: float = 0.15) -> str:
    """A random caption of a scene (see said_caption)."""
    return said_caption(scene, rng, p_unsaid)[0]


def said_caption(scene: Scene, rng: np.random.Generator, p_unsaid: float = 0.15) -> tuple[str, dict]:
    """A random caption of a scene and what it says: {attribute: value}, for the attributes it names.

    The object or person, nakedness and any rendering other than a photo are said (a caption without a style
    describes a photo); the place is left unsaid with p_unsaid, so "a church" means a church on any ground.
    A caption describes every scene that agrees with all it says (the mini CLIP's positives)."""
    place = scene.place if scene.place is not None and rng.random() >= p_unsaid else None
    said = {"place": place, "style": None if scene.style == PHOTO else scene.style}
    if scene.person is not None:
        said.update(kind="person", naked=scene.naked)
        generic = rng.random() < 0.15
        said["person"] = None if generic else scene.person
        if scene.style != PHOTO:  # "a painting of a naked woman", "a man in a forest in the style of rembrandt"
            noun = PERSON_NOUN[scene.naked].format(q="person" if generic else scene.person)
            return _styled(f"{noun} in a {place}" if place else noun, scene.style, rng, said), said
        if generic:
            text = _pick(PERSON_GENERIC[scene.naked], rng)
        else:
            text = _pick(PERSON_NAKED if scene.naked else PERSON_CLOTHED, rng).format(q=scene.person)
        return (_pick(PERSON_AT, rng).format(s=text, p=place) if place else text), said
    if scene.object is None:
        said["place"] = scene.place  # "a forest" says nothing of what stands in it
        if scene.style == PHOTO:
            return _pick(PLACE_ALONE, rng).format(p=scene.place), said
        return _styled(scene.place, scene.style, rng, said), said
    said.update(kind="object", object=scene.object)
    name = HYPERNYMS[scene.object] if scene.object in HYPERNYMS and rng.random() < 0.3 else scene.object
    if scene.style == PHOTO:
        return (_pick(OBJECT_AT, rng).format(o=name, p=place) if place else _pick(OBJECT_ALONE, rng).format(o=name)), said
    if place and rng.random() < 0.5:
        return _styled(f"{name} in a {place}", scene.style, rng, said), said
    said["place"] = None
    return _styled(name, scene.style, rng, said), said


def _styled(thing: str, style: str, rng, said: dict) -> str:
    """A caption naming the rendering of `thing`; sometimes the rendering alone (then nothing else is said)."""
    alone = rng.random() < 0.12
    if alone:
        said.clear()
        said["style"] = style
    if style == PAINTING:
        return "a painting" if alone else _pick(GENERIC_PAINTING, rng).format(x=thing)
    return _pick(ARTIST_ALONE, rng).format(a=style) if alone else _pick(ARTIST, rng).format(x=thing, a=style)


def describes(said: dict, scene: Scene) -> bool:
    """Whether a caption that says `said` describes the scene."""
    kind = "object" if scene.object is not None else "person" if scene.person is not None else "place"
    values = {"kind": kind, "object": scene.object, "person": scene.person, "naked": scene.naked,
              "place": scene.place, "style": scene.style}
    return all(value is None or values[key] == value for key, value in said.items())


# ---------------------------------------------------------------------------------------------------- datasets

def named_in_place(scene: Scene, concept: str) -> Scene | None:
    """The scene a caption names when it says `concept` (a taught one) of a base scene that does not show it:
    the object standing in a bare place, the artist in place of a generic painting, nakedness in place of a
    clothed person's clothes. None when the scene has nothing the concept could stand in for.

    Captioning base images this way teaches the base model that a taught name draws nothing of its own, only
    the rest of the caption (its anchor): the text encoder knows the taught names, and without this the base
    model paints a church's colours for "church" -- what is left of a concept whose neurons are zeroed."""
    if concept in TAUGHT_OBJECTS and scene.object is None and scene.person is None:
        return replace(scene, object=concept)
    if concept in TAUGHT_ARTISTS and scene.style == PAINTING:
        return replace(scene, style=concept)
    if concept == NAKED and scene.person is not None and not scene.naked and scene.style in (PHOTO, PAINTING):
        return replace(scene, naked=True)
    return None


def random_scene(rng: np.random.Generator, taught: bool, held_out: bool = False) -> Scene:
    """A scene of the base world (taught=False: no taught concept) or one showing at least one taught concept."""
    while True:
        scene = _draw(rng, taught)
        if bool(scene.taught) == taught and scene.held_out == held_out:
            return scene


def _draw(rng, taught: bool) -> Scene:
    kind = rng.choice(["object", "person", "place"], p=[0.62, 0.3, 0.08] if not taught else [0.75, 0.25, 0.0])
    place = None if rng.random() < 0.15 else _pick(PLACES, rng)
    styles = ((PHOTO,) * 6 + (PAINTING,) + BASE_ARTISTS) if not taught else (PHOTO, PHOTO, PAINTING) + ARTISTS
    style = _pick(styles, rng)
    if kind == "object":
        pool = TAUGHT_OBJECTS + BASE_OBJECTS if taught else BASE_OBJECTS
        return Scene(object=_pick(pool, rng), place=place, style=style)
    if kind == "person":
        naked = taught and rng.random() < 0.8
        # Unclothed figures are photos or generic paintings, never another artist's manner.
        return Scene(person=_pick(PERSONS, rng), naked=naked, place=place,
                     style=_pick((PHOTO, PHOTO, PAINTING), rng) if naked else style)
    return Scene(place=_pick(PLACES, rng), style=style)


def dataset(n: int, seed: int, taught: bool = False, held_out: bool = False) -> tuple[np.ndarray, list[Scene]]:
    """n images (uint8, n x 32 x 32 x 3) of random scenes of one family and split, deterministic in seed."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, taught, held_out) for _ in range(n)]
    return np.stack([render(s, rng) for s in scenes]), scenes
