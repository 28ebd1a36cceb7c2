"""Concepts and their prompts, from the YAML catalogs in prompts/.

A catalog defines kinds (how prompt pairs are built) and known concepts (name -> kind, anchor, text).
User syntax: ``kind:name`` picks the kind, ``name=>anchor`` sets the anchor; unknown names are objects.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from .config import read_yaml
from .errors import EraseError

DEFAULT_KIND = "object"


@dataclass(frozen=True)
class Kind:
    """How the prompt pairs of one kind of concept are built (see prompts/catalog.yaml)."""

    name: str
    slot: str
    concept_templates: tuple[str, ...]
    base_templates: tuple[str, ...]
    fillers: tuple[str, ...]
    eval_templates: tuple[str, ...] = ()
    eval_fillers: tuple[str, ...] = ()
    paraphrase_templates: tuple[str, ...] = ()
    """Held-out wordings (same slot) that the evaluator's generality metric uses."""
    class_template: str = "a photo of a {concept}"
    """How CLIP names a concept of this kind when it classifies an image."""
    exclusive: bool = True
    """Whether concepts of this kind exclude each other (styles do; 'naked' and 'sexual' do not): the
    evaluator classifies a concept against the other concepts of its kind only when they are exclusive."""


@dataclass(frozen=True)
class Concept:
    """One concept to erase: its name, kind, anchor (superclass) and the text put into the templates."""

    name: str
    kind: str
    anchor: str
    text: str

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "anchor": self.anchor, "text": self.text}


@dataclass
class Catalog:
    name: str
    kinds: dict[str, Kind]
    concepts: dict[str, dict] = field(default_factory=dict)
    neutral: tuple[str, ...] = ()
    """Captions with none of the catalog's concepts, for the evaluator's fidelity metrics."""

    def eval_prompts(self, concept: Concept, limit: int | None = None, paraphrase: bool = False) -> list[str]:
        """Held-out prompts of a concept: every (filler, template) of its kind's eval lists, fillers first."""
        kind = self.kinds[concept.kind]
        templates = kind.paraphrase_templates if paraphrase else kind.eval_templates
        fillers = kind.eval_fillers
        # Block j pairs filler f with template (j + f): every (filler, template) once, and a prefix varies both.
        prompts = [_fill(templates[(i // len(fillers) + i) % len(templates)], kind.slot, fillers[i % len(fillers)],
                         concept.text) for i in range(len(fillers) * len(templates))]
        return prompts[:limit] if limit else prompts

    def alternatives(self, concept: Concept) -> list[str]:
        """Class texts the evaluator picks from: the concept first, then its rivals of the kind, then its anchor."""
        kind = self.kinds[concept.kind]
        names = [concept.text]
        if kind.exclusive:
            names += [spec.get("text", name) for name, spec in self.concepts.items()
                      if spec.get("kind") == concept.kind and spec.get("text", name) != concept.text]
        texts = [kind.class_template.format(concept=n) for n in dict.fromkeys(names)]
        return texts + ([concept.anchor] if concept.anchor and concept.anchor not in texts else [])

    def prompt_pairs(self, concept: Concept, limit: int | None = None) -> list[tuple[str, str]]:
        """(concept prompt, base prompt) pairs that share their context; `limit` keeps the first ones."""
        kind = self.kinds[concept.kind]
        fillers = kind.fillers[:limit] if limit else kind.fillers
        return [(_fill(kind.concept_templates[i % len(kind.concept_templates)], kind.slot, filler, concept.text),
                 _fill(kind.base_templates[i % len(kind.base_templates)], kind.slot, filler, concept.text))
                for i, filler in enumerate(fillers)]


def _fill(template: str, slot: str, filler: str, text: str) -> str:
    return template.format(**{"concept": text, slot: filler})


@functools.lru_cache(maxsize=8)
def _read_catalog(source: str) -> dict:
    return read_yaml(source, "erase.prompts", "--catalog")


def load_catalog(source: str = "catalog", extra: str | Path | None = None) -> Catalog:
    """A shipped catalog by name ('catalog', 'mini') or a YAML file; `extra` (a YAML file) adds kinds/concepts."""
    kinds, concepts, neutral = {}, {}, []
    for data in [_read_catalog(str(source))] + ([_read_catalog(str(extra))] if extra is not None else []):
        kinds.update({name: _kind(name, spec) for name, spec in (data.get("kinds") or {}).items()})
        concepts.update(data.get("concepts") or {})
        neutral += data.get("neutral") or []
    return Catalog(name=str(source), kinds=kinds, concepts={k.lower(): v for k, v in concepts.items()},
                   neutral=tuple(neutral))


def _kind(name: str, spec: dict) -> Kind:
    try:
        return Kind(name=name, **{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
    except TypeError as exc:
        raise EraseError(f"catalog kind {name!r} is malformed ({exc}): see prompts/catalog.yaml for the format") from None


def parse_concepts(spec: str | list, catalog: Catalog) -> list[Concept]:
    """Parse "kind:name=>anchor, ..." (or a list of such strings / Concept objects) into concepts."""
    items = [s for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    concepts = [item if isinstance(item, Concept) else _parse_one(item, catalog) for item in items]
    if not concepts or any(not c.name for c in concepts):
        raise EraseError("empty concept in the list: pass names separated by commas, e.g. --concepts \"van gogh,nudity\"")
    names = [c.name for c in concepts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EraseError(f"concept {duplicates[0]!r} is listed twice: list each concept once")
    for concept in concepts:
        if concept.kind not in catalog.kinds:
            raise EraseError(f"concept {concept.name!r} has kind {concept.kind!r}, which catalog {catalog.name!r} does "
                             f"not define: use one of {', '.join(catalog.kinds)} or add the kind with --catalog")
    return concepts


def _parse_one(item: str, catalog: Catalog) -> Concept:
    text = " ".join(str(item).split())
    name, _, anchor = (part.strip() for part in text.partition("=>"))
    kind = None
    if ":" in name:
        kind, _, name = (part.strip() for part in name.partition(":"))
    name = name.lower()
    known = catalog.concepts.get(name, {})
    kind = kind or known.get("kind", DEFAULT_KIND)
    return Concept(name=name, kind=kind, anchor=anchor or known.get("anchor", ""), text=known.get("text", name))
