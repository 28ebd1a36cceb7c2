"""Method configs: dataclass defaults are the source of truth; YAML presets and key=value settings override them."""

from __future__ import annotations

import dataclasses
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
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise EraseError(f"{option} {ref} must be a YAML mapping")
    return data


def read_preset(preset: str | Path) -> dict:
    """A method preset: a YAML file, or the name of one shipped in configs/."""
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
        node[leaf] = yaml.safe_load(value)
    return settings


def build_config(cls: type, settings: dict) -> Any:
    """The dataclass `cls` with `settings` applied over its defaults, validated."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise EraseError(f"unknown setting {unknown[0]!r} for {cls.__name__}: valid settings are {', '.join(fields)}")
    config = cls(**settings)
    config.validate()
    return config


def check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise EraseError(f"{name}={value!r} is out of range: it must lie in (0, 1], e.g. --set {name.split('.')[-1]}=0.05")


def check_positive(name: str, value: Any, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise EraseError(f"{name}={value!r} is out of range: it must be a positive number, e.g. --set {name}={example}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EraseError(f"{name}={value!r} is out of range: it must be a whole number ≥ 1")


def as_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
