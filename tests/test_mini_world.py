"""The miniature world: generator, catalog, shipped pipeline and shipped CLIP judge (offline, a few seconds)."""

import itertools
import re

import numpy as np
import pytest
import torch
from PIL import Image

import erase
from erase.concepts import load_catalog, parse_concepts
from erase.mini import world
from erase.mini.clip import load_mini_clip, zero_shot


def test_generator_is_deterministic_in_its_seed():
    a, attrs_a = world.dataset(8, seed=3)
    b, attrs_b = world.dataset(8, seed=3)
    c, _ = world.dataset(8, seed=4)
    assert a.shape == (8, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and attrs_a == attrs_b
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("colour", world.ALL_COLOURS)
def test_plain_shapes_are_filled_with_their_colour(colour):
    image = world.render(world.Attributes("square", colour, "plain"), np.random.default_rng(0))
    rgb = world.COLOURS.get(colour, world.ANCHOR_RGB)
    centre = image[12:20, 12:20].reshape(-1, 3)
    assert np.abs(centre.astype(int) - rgb).max() <= 1
    assert (image[0, 0] >= 245).all()  # white ground


def test_shapes_differ_and_styles_change_the_rendering():
    rng = np.random.default_rng(0)
    masks = {s: world.render(world.Attributes(s, "blue", "plain"), rng).min(axis=2) < 200 for s in world.SHAPES}
    for a, b in itertools.combinations(world.SHAPES, 2):
        assert (masks[a] ^ masks[b]).sum() >= 40, (a, b)
    renders = [world.render(world.Attributes("circle", "red", s), np.random.default_rng(1)) for s in world.ALL_STYLES]
    for a, b in itertools.combinations(renders, 2):
        assert np.abs(a.astype(int) - b).mean() > 5


def test_held_out_combinations_are_a_disjoint_split_of_known_values():
    train, held = world.combinations(), world.combinations(held_out=True)
    assert held and not set(train) & set(held)
    assert len(train) + len(held) == len(world.SHAPES) * len(world.ALL_COLOURS) * len(world.ALL_STYLES)
    for name, values in (("shape", world.SHAPES), ("colour", world.ALL_COLOURS), ("style", world.ALL_STYLES)):
        assert {getattr(a, name) for a in train} == set(values)


def test_captions_name_the_attributes():
    assert world.describe("circle", "red", "orlo") == "a red circle painted by orlo"
    assert world.describe("circle", "red", "orlo", template=1) == "orlo's painting of a red circle"
    assert world.describe(colour="red") == "a red shape"
    assert world.describe(style="plain") == "a plain drawing"
    assert world.caption(world.Attributes("star", "blue", "pim"), np.random.default_rng(0), p_unsaid=0.0).count(" ") >= 3


def test_catalog_has_the_catalog_format_and_names_every_attribute():
    catalog = load_catalog("mini")
    assert set(catalog.kinds) == {"object", "style", "colour"}
    expected = {**{s: "object" for s in world.SHAPES}, **{a: "style" for a in world.ARTISTS},
                **{c: "colour" for c in world.COLOURS}}
    assert {name: spec["kind"] for name, spec in catalog.concepts.items()} == expected
    tokenizer = erase.clip_tokenizer()
    for concept in parse_concepts(list(expected), catalog):
        assert concept.anchor
        kind = catalog.kinds[concept.kind]
        pairs = catalog.prompt_pairs(concept)
        assert len(pairs) == len(kind.fillers) >= 7
        for prompt, base in pairs:
            assert concept.text in re.findall("[a-z]+", prompt) and concept.text not in re.findall("[a-z]+", base)
            assert len(tokenizer(prompt).input_ids) <= 16
        evals = {t.format(concept=concept.text, **{kind.slot: f}) for t in kind.eval_templates for f in kind.eval_fillers}
        assert evals and not evals & {p for p, _ in pairs}


@pytest.fixture(scope="module")
def mini_clip():
    return load_mini_clip()


def test_mini_pipeline_loads_offline_and_generates(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = erase.load_pipeline("mini")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32
    assert sum(name.endswith("ff.net.2") for name, _ in pipe.unet.named_modules()) >= 6
    image = pipe("a red circle painted by orlo", num_inference_steps=3,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)


def test_mini_clip_classifies_fresh_images(mini_clip):
    arrays, truth = world.dataset(24, seed=123)
    seen = zero_shot(*mini_clip, [Image.fromarray(x) for x in arrays])
    for name in ("shape", "colour", "style"):
        assert np.mean([getattr(t, name) == getattr(s, name) for t, s in zip(truth, seen)]) >= 0.8, name
