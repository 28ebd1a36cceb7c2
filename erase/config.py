"""Method configs: dataclass defaults are the source of truth; YAML presets and key=value settings override them."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import EraseError


def read_yaml(ref: str | Path, package: str, option: str) -> dict:
    """A YAML mapping from a file path, or from a file shipped in `package` named by `ref` (e.g. 'fia-style')."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise EraseError(f"{option} file {path} does not exist: check the {option} path")
        text = path.read_text()
    else:
        shipped = resources.files(package)
        if not shipped.joinpath(f"{ref}.yaml").is_file():
            names = sorted(p.name[:-5] for p in shipped.iterdir() if p.name.endswith(".yaml"))
            raise EraseError(f"unknown {option} {ref!r}: pass a YAML file or one of {', '.join(names)}")
        text = shipped.joinpath(f"{ref}.yaml").read_text()
    data = parse_yaml(text, f"{option} {ref}") or {}
    if not isinstance(data, dict):
        raise EraseError(f"{option} {ref} must be a YAML mapping")
    return data


MAX_ALIASED_VALUES = 10_000
"""How many values YAML aliases may add to a document: far above any real catalog (the shipped one has ~500 values
in all), far below a "billion laughs" (nested aliases that expand to 10⁹ values and exhaust memory downstream)."""


def parse_yaml(text: str, where: str) -> Any:
    """safe_load (no !!python tags), refusing aliases that expand the document and nesting that exhausts the stack
    before anything reads the values."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_aliases(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise EraseError(f"{where} is not valid YAML{at} ({getattr(exc, 'problem', None) or exc}): "
                         "fix the syntax (quote values with brackets, colons or commas)") from None
    except RecursionError:
        raise EraseError(f"{where} nests its values too deeply to read: flatten it") from None
    finally:
        loader.dispose()


def _check_aliases(root: yaml.Node, where: str) -> None:
    """Count the values the document stands for with every alias expanded, on the composed graph (where an alias
    is one shared node, so counting is cheap): refused if aliases add more than MAX_ALIASED_VALUES or refer to
    themselves."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def expanded(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise EraseError(f"{where} has a YAML alias inside its own anchor: write the value out")
        open_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        sizes[id(node)] = 1 + sum(expanded(child) for child in children)
        open_nodes.discard(id(node))
        return sizes[id(node)]

    total = expanded(root)
    if total - len(sizes) > MAX_ALIASED_VALUES:
        raise EraseError(f"{where} uses YAML aliases that expand it to {total:,} values (aliases may add at most "
                         f"{MAX_ALIASED_VALUES:,}): write the values out instead of nesting aliases")


def read_preset(preset: str | Path) -> dict:
    """A method preset: a YAML file, or the name of one shipped in erase/configs/."""
    return read_yaml(preset, "erase.configs", "--config")


def parse_settings(pairs: list[str]) -> dict:
    """['r2=0.03', 'overrides.van gogh.r2=0.03'] → nested dict; values are parsed as YAML scalars."""
    settings: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise EraseError(f"--set {pair!r} is not key=value: write e.g. --set r2=0.03")
        *parents, leaf = [part.strip() for part in key.split(".")]
        node = settings
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_yaml(value, f"the value of {pair!r}")
    return settings


def build_config(cls: type, settings: dict) -> Any:
    """The dataclass `cls` with `settings` applied over its defaults, validated."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise EraseError(f"unknown setting {unknown[0]!r} for {cls.__name__}: valid settings are {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in fields.values() if f.default is not dataclasses.MISSING}
    checked = {name: checked_value(name, value, hints[name], defaults.get(name)) for name, value in settings.items()}
    config = cls(**checked)
    config.validate()
    return config


KINDS = {float: ("a finite number", 0.5), int: ("a whole number", 1), bool: ("true or false", "true"),
         str: ("text", "text"), list: ("a list", "[0, 1]"), dict: ("a mapping", "{key: value}")}


def checked_value(name: str, value: Any, hint: Any, example: Any = None) -> Any:
    """`value` if it has the type its setting is annotated with, else one line naming the type and an example.

    One check for every setting of every method: NaN and infinities are not numbers, True is not 1, and a
    number YAML read as text (1e-5 has no dot) is read as a number.
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        return None if value is None else checked_value(name, value, args[0], example)
    kind = typing.get_origin(hint) or hint
    if kind not in KINDS:
        return value
    if kind is float and isinstance(value, str):
        value = _number_or_text(value)
    if not _has_kind(value, kind):
        expected, fallback = KINDS[kind]
        example = fallback if example is None or isinstance(example, (list, dict, bool)) else example
        raise EraseError(f"{name}={value!r} is not {expected}: write e.g. {name}={example}")
    if kind is list:
        return [checked_value(f"{name}[{i}]", item, args[0]) for i, item in enumerate(value)]
    if kind is dict:
        return {key: checked_value(f"{name}.{key}", item, args[1]) for key, item in value.items()}
    return value


def _has_kind(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise EraseError(f"{name}={value!r} is out of range: it must lie in (0, 1], e.g. --set {name.split('.')[-1]}=0.05")


def check_positive(name: str, value: Any, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise EraseError(f"{name}={value!r} is out of range: it must be a positive number, e.g. --set {name}={example}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise EraseError(f"{name}={value!r} is unknown: use one of {', '.join(choices)}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EraseError(f"{name}={value!r} is out of range: it must be a whole number ≥ 1")


def config_from(config_class: type, config: Any, key: str, name: str, example: str, **overrides) -> Any:
    """`config_class` from an instance of it, a dict or a YAML preset (a file, or a name shipped in erase/configs/) whose
    `key` (method, kind), if it names one, must be `name`; keyword overrides win (nested maps merge). An instance
    without overrides is validated and used as it is: the CLI builds its config once, before the model loads."""
    if isinstance(config, config_class) and not overrides:
        config.validate()
        return config
    if isinstance(config, config_class):
        settings = as_dict(config)
    elif config is None or isinstance(config, dict):
        settings = dict(config or {})
    elif isinstance(config, (str, Path)):
        settings = read_preset(config)
    else:
        raise EraseError(f"config must be a preset name, a YAML path, a dict or a {config_class.__name__}, "
                         f"not {type(config).__name__}: e.g. {example}")
    preset = settings.pop(key, name)
    if preset != name:
        raise EraseError(f"config is a preset for {key} {preset!r}, not {name!r}: pass --{key} {preset} or another config")
    return build_config(config_class, _merge(settings, overrides))


def _merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, merging nested maps (a preset's overrides survive --set overrides.x.r2=...)."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def check_seeds(seeds: Any) -> None:
    if seeds is not None and (not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise EraseError("seeds must be a non-empty list of whole numbers, e.g. seeds=[0, 1]")


def check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise EraseError(f"confidence={confidence} is out of range: it must lie in (0, 1), e.g. 0.95")


def check_positive_ints(config: Any, *names: str) -> None:
    for name in names:
        check_positive_int(name, getattr(config, name))


def as_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
