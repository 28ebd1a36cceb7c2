"""Prompt files as the field publishes them: a CSV with a prompt column and optional seed, guidance and categories
columns (I2P as published: sd_seed, sd_guidance_scale; the 4,703-prompt file of the erasure papers:
evaluation_seed, evaluation_guidance, case_number; COCO caption files: caption), or a TXT file of one prompt a line.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import EraseError
from .core import Sample

PROMPT_COLUMNS = ("prompt", "caption", "text")
SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance_scale", "guidance")
CASE_COLUMNS = ("case_number", "image_id", "id")


def read_prompt_file(path: str | Path | None, categories: list[str] | None = None) -> list[Sample]:
    """The file's rows as samples, in file order: each row's prompt, seed (its own, else its row number, from 0) and
    guidance (its own, else None: the settings'), its categories and case number kept for the report. categories:
    keep only the rows listing one of them (I2P's categories column, e.g. ["sexual"])."""
    if path is None:
        raise EraseError("this protocol needs a prompt file: pass --prompts FILE (a CSV with a prompt column, or a TXT "
                         "file of one prompt a line)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise EraseError(f"the prompt file {path} does not exist: pass --prompts with a CSV or TXT file")
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    rows = _csv_rows(text, path) if path.suffix.lower() == ".csv" else [{"prompt": line} for line in text.splitlines()]
    samples = [_sample(row, n, path) for n, row in enumerate(rows) if _prompt(row)]
    if categories:
        wanted = {c.strip().lower() for c in categories}
        samples = [s for s in samples if wanted & set(s.info.get("categories", []))]
    return samples


def _csv_rows(text: str, path: Path) -> list[dict]:
    reader = csv.DictReader(text.splitlines())
    columns = {c.strip().lower() for c in reader.fieldnames or []}
    if not columns & set(PROMPT_COLUMNS):
        raise EraseError(f"{path} has no prompt column (columns: {', '.join(sorted(columns)) or 'none'}): name it one "
                         f"of {', '.join(PROMPT_COLUMNS)}")
    return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]


def _prompt(row: dict) -> str:
    return next((row[c] for c in PROMPT_COLUMNS if row.get(c)), "").strip()


def _sample(row: dict, n: int, path: Path) -> Sample:
    seed = _number(row, SEED_COLUMNS, int, n, path)
    guidance = _number(row, GUIDANCE_COLUMNS, float, n, path)
    info = {"row": n}
    if row.get("categories"):
        info["categories"] = [c.strip().lower() for c in row["categories"].split(",") if c.strip()]
    if case := next((row[c] for c in CASE_COLUMNS if row.get(c)), None):
        info["case"] = case
    return Sample(_prompt(row), n if seed is None else seed, guidance, info)


def _number(row: dict, columns: tuple[str, ...], kind: type, n: int, path: Path):
    column = next((c for c in columns if row.get(c)), None)
    if column is None:
        return None
    try:
        value = kind(float(row[column])) if kind is int else kind(row[column])
    except ValueError:
        raise EraseError(f"{path}, row {n + 1}: {column}={row[column]!r} is not a number: fix or empty it") from None
    if kind is int and value < 0 or kind is float and not value > 0:
        raise EraseError(f"{path}, row {n + 1}: {column}={row[column]!r} is out of range: a seed is ≥ 0, a guidance > 0")
    return value
