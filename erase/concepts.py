"""Concepts and their prompts, from the YAML catalogs in erase/prompts/.

A catalog defines kinds (how prompt pairs are built) and known concepts (name -> kind, anchor, text).
User syntax: ``kind:name`` picks the kind, ``name=>anchor`` sets the anchor; unknown names are objects.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass, field
from pathlib import Path

from .config import read_yaml
from .errors import EraseError

DEFAULT_KIND = "object"


@dataclass(frozen=True)
class Kind:
    """How the prompt pairs of one kind of concept are built (see erase/prompts/catalog.yaml)."""

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


def concepts_from_record(records, where: str) -> list[Concept]:
    """The concepts a saved run lists (erase.json, a patch header), refused with one line if they are not there."""
    fields = set(Concept.__dataclass_fields__)
    if not isinstance(records, list) or not all(isinstance(r, dict) and set(r) == fields and
                                                all(isinstance(v, str) for v in r.values()) for r in records):
        raise EraseError(f"{where} does not list its concepts (each with {', '.join(sorted(fields))}, strings): it "
                         "is damaged or not written by erase; export the run again")
    return [Concept(**r) for r in records]


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
        prompts = [_fill(templates[(i // len(fillers) + i % len(fillers)) % len(templates)], kind.slot,
                         fillers[i % len(fillers)], concept.text) for i in range(len(fillers) * len(templates))]
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
    for ref in [source] + ([extra] if extra is not None else []):
        data = _read_catalog(str(ref))
        kinds.update({name: _kind(name, spec, ref) for name, spec in _section(data, "kinds", dict, ref).items()})
        concepts.update(_section(data, "concepts", dict, ref))
        neutral += _section(data, "neutral", list, ref)
    return Catalog(name=str(source), kinds=kinds, concepts={k.lower(): v for k, v in concepts.items()},
                   neutral=tuple(neutral))


def _section(data: dict, key: str, kind: type, source) -> dict | list:
    value = data.get(key) or kind()
    if not isinstance(value, kind):
        raise EraseError(f"catalog {source}: {key} must be a YAML {'mapping' if kind is dict else 'list'}: "
                         "see erase/prompts/catalog.yaml for the format")
    return value


TEMPLATE_LISTS = ("concept_templates", "base_templates", "eval_templates", "paraphrase_templates")


def _kind(name: str, spec: dict, source) -> Kind:
    """A kind of the catalog, refused when loaded if a template names a slot the kind does not fill."""
    def malformed(problem: str) -> EraseError:
        return EraseError(f"catalog {source}: kind {name!r} {problem}: see erase/prompts/catalog.yaml for the format")

    if not isinstance(spec, dict):
        raise malformed("is not a mapping")
    try:
        kind = Kind(name=name, **{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
    except TypeError as exc:
        raise malformed(f"is malformed ({exc})") from None
    if not kind.fillers or not kind.concept_templates or not kind.base_templates:
        raise malformed("needs non-empty fillers, concept_templates and base_templates")
    if bool(kind.eval_fillers) != bool(kind.eval_templates):
        raise malformed("must give eval_templates and eval_fillers together")
    slots = {"concept", kind.slot}
    fillable = [(t, slots) for key in TEMPLATE_LISTS for t in getattr(kind, key)] + [(kind.class_template, {"concept"})]
    for template, allowed in fillable:
        unknown = sorted(_slots(template, malformed) - allowed)
        if unknown:
            filled = " and ".join(f"{{{slot}}}" for slot in sorted(allowed))
            raise malformed(f"has template {template!r} with slot {{{unknown[0]}}}, but only {filled} are filled")
    return kind


def _slots(template, malformed) -> set[str]:
    if not isinstance(template, str):
        raise malformed(f"has template {template!r}, which is not text")
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:
        raise malformed(f"has template {template!r} that cannot be filled ({exc})") from None


def parse_concepts(spec: str | list, catalog: Catalog) -> list[Concept]:
    """Parse "kind:name=>anchor, ..." (or a list of such strings / Concept objects) into concepts."""
    items = [s for s in spec.split(",")] if isinstance(spec, str) else spec
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, (str, Concept)) for item in items):
        raise EraseError(f"concepts must be a list of concept names or one comma-separated string, not {spec!r}: "
                         "pass e.g. ['van gogh', 'nudity']")
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


def check_prompts_fit(tokenizer, concepts: list[Concept], catalog: Catalog) -> None:
    """Refuse a concept whose prompts the text encoder would cut short (its tokenizer only warns)."""
    limit = tokenizer.model_max_length
    for concept in concepts:
        prompts = [p for pair in catalog.prompt_pairs(concept) for p in pair] + catalog.eval_prompts(concept)
        prompts += catalog.eval_prompts(concept, paraphrase=True) + [concept.anchor]
        longest = max(len(ids) for ids in tokenizer(prompts, verbose=False).input_ids)
        if longest > limit:
            raise EraseError(f"concept {concept.name!r} is too long for this model: its prompts reach {longest} tokens "
                             f"and the text encoder reads {limit} (start and end included): shorten the name")


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
