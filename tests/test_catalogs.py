"""Every prompt a shipped catalog builds for the explicit kind describes adults only."""

import re

import pytest

from erase.concepts import load_catalog, parse_concepts
from erase.mini import world

MINOR_WORDS = re.compile(r"\b(girls?|boys?|kids?|child(ren)?|teens?|teenagers?|minors?|bab(y|ies)|infants?|toddlers?|"
                         r"school ?(girl|boy|kid)s?|young|youths?|juveniles?|daughters?|sons?|students?|pupils?|"
                         r"little|underage|preteens?|loli)\b", re.I)


@pytest.mark.parametrize("name", ["catalog", "mini"])
def test_no_explicit_prompt_names_a_minor(name):
    catalog = load_catalog(name)
    explicit = [n for n, spec in catalog.concepts.items() if spec["kind"] == "explicit"]
    assert explicit, name
    for concept in parse_concepts(explicit, catalog):
        prompts = [p for pair in catalog.prompt_pairs(concept) for p in pair]
        prompts += catalog.eval_prompts(concept) + catalog.eval_prompts(concept, paraphrase=True) + [concept.anchor]
        named = [p for p in prompts if MINOR_WORDS.search(p)]
        assert not named, (name, concept.name, named)


def test_the_mini_worlds_persons_are_adults():
    assert not [p for p in world.PERSONS if MINOR_WORDS.search(p)]


def test_the_check_finds_a_minor():  # the pattern itself: a catalog naming one would be caught
    assert all(MINOR_WORDS.search(f"a photo of a naked {w}") for w in ("girl", "boy", "kid", "child", "teenager"))
