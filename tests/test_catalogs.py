"""Every prompt a shipped catalog builds for the explicit kind describes adults only; held-out prompts never repeat."""

import re

import pytest

from erase.concepts import load_catalog, parse_concepts
from erase.mini import world

MINOR_WORDS = re.compile(r"\b(girls?|boys?|kids?|child(ren)?|teens?|teenagers?|minors?|bab(y|ies)|infants?|toddlers?|"
                         r"school ?(girl|boy|kid)s?|young|youths?|juveniles?|daughters?|sons?|students?|pupils?|"
                         r"little|underage|preteens?|loli)\b", re.IGNORECASE)


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


@pytest.mark.parametrize("name", ["catalog", "mini"])
def test_held_out_prompts_are_every_filler_and_template_once(name):
    """A prompt listed twice would count its images twice in forgetting accuracy (seen with 5 fillers, 3 templates)."""
    catalog = load_catalog(name)
    for concept in parse_concepts(list(catalog.concepts), catalog):
        kind = catalog.kinds[concept.kind]
        for paraphrase in (False, True):
            prompts = catalog.eval_prompts(concept, paraphrase=paraphrase)
            templates = kind.paraphrase_templates if paraphrase else kind.eval_templates
            assert len(prompts) == len(kind.eval_fillers) * len(templates), (name, concept.name)
            assert len(set(prompts)) == len(prompts), (name, concept.name, paraphrase)
