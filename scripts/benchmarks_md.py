"""Write one section of BENCHMARKS.md, leaving the sections other scripts own untouched."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from pathlib import Path

from erase.export import replace_section, section_pattern

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEvery section is written by the script it names; rerun the script to refresh it. A section's "
          "notes (what was tried and what it showed, in a marked block at its end) are kept when it is written again; "
          "add one with the script's --note.\n")


@contextlib.contextmanager
def turn(path: Path):
    """Hold the lock file beside `path`: scripts run side by side take turns at reading and rewriting it."""
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


NOTES, NOTES_END = "<!-- notes: kept when the script runs again; add one with its --note -->", "<!-- end of notes -->"


def update_section(title: str, body: str, path: Path = BENCHMARKS, note: str | None = None) -> None:
    """Replace (or append) the section `## {title}` with `body`, atomically; scripts run side by side take turns,
    so neither loses the other's section. The section's notes (prose between NOTES and NOTES_END at its end: what
    was tried, what it showed) stay after the new body, `note` added first: measuring a table again keeps them."""
    with turn(path):
        text = path.read_text() if path.exists() else HEADER
        notes = [p for p in (note, section_notes(text, title)) if p]
        block = "\n\n".join([NOTES, *notes, NOTES_END]) if notes else ""
        write_atomically(path, replace_section(text, title, f"{body.strip()}\n\n{block}"))


def section_notes(text: str, title: str) -> str:
    """The notes of section `## {title}` in `text` (empty where it has none)."""
    section = section_pattern(title).search(text)
    notes = section and re.search(rf"{re.escape(NOTES)}(.*?){re.escape(NOTES_END)}", section.group(0), re.DOTALL)
    return notes.group(1).strip() if notes else ""


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file beside `path`, then rename: a stopped script never leaves half a file. The
    file gets the permissions a plain write would give it (mkstemp's are owner-only)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


class RowStore:
    """A benchmark's measured rows, kept in a JSON file as each lands (a long run stopped early keeps what it
    measured; a later run measures only what is missing). `key` names the fields that identify a row; each row is
    stamped with `model`, the fingerprint of the UNet it was measured on, and with `guidance` where the benchmark
    samples images. A row stamped otherwise counts as missing (it is shown, marked, until measured again).
    path None keeps the rows in memory only: a print-only run shows what it measured, never the recorded rows."""

    def __init__(self, path: Path | None, key: tuple[str, ...], model: str, guidance: float | None = None):
        self.path, self.key, self.model = path, key, model
        self.stamp = {"model": model} | ({} if guidance is None else {"guidance": guidance})
        self.rows: list[dict] = json.loads(path.read_text()) if path and path.is_file() else []

    def identity(self, row: dict) -> tuple:
        return tuple(json.dumps(row[k], sort_keys=True) for k in self.key)

    def current(self, row: dict) -> bool:
        """Whether `row` was measured on this model at this guidance."""
        return all(row.get(k) == v for k, v in self.stamp.items())

    def get(self, **fields) -> dict | None:
        """The row with these key fields measured on this model (at this guidance), if any."""
        return next((r for r in self.rows if self.current(r) and self.identity(r) == self.identity(fields)), None)

    def has(self, **fields) -> bool:
        return self.get(**fields) is not None

    def put(self, row: dict) -> None:
        """Record `row` (measured on this model) in place of the one with the same key, atomically. The file is read
        again first: rows another run of the same benchmark landed meanwhile are kept."""
        row = {**row, **self.stamp}
        if self.path is None:
            self.rows = self.replaced(self.rows, row)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with turn(self.path):
            landed = json.loads(self.path.read_text()) if self.path.is_file() else []
            self.rows = self.replaced(landed, row)
            write_atomically(self.path, json.dumps(self.rows, indent=1) + "\n")

    def replaced(self, rows: list[dict], row: dict) -> list[dict]:
        """`rows` with `row` in place of the one with its key."""
        return [r for r in rows if self.identity(r) != self.identity(row)] + [row]

    def stale_note(self, command: str) -> list[str]:
        """A line for the table when some rows were measured on another model, or at another guidance, than now."""
        stale = [r for r in self.rows if not self.current(r)]
        if not stale:
            return []
        shipped = f"the shipped UNet {self.model.removeprefix('sha256:')[:12]}…"
        if "guidance" in self.stamp:
            shipped += f" at guidance {self.stamp['guidance']:g}"
        return [(f"_{len(stale)} of these {len(self.rows)} rows were measured on an earlier mini model or at another "
                 f"guidance (not {shipped}) and are marked †; `{command}` measures them again._"), ""]

    def mark(self, row: dict) -> str:
        return "" if self.current(row) else " †"


def mini_model() -> str:
    """The fingerprint of the shipped mini model's UNet, which stamps the rows measured on it."""
    from diffusers import UNet2DConditionModel

    from erase.edits import fingerprint
    from erase.models import MINI_PIPELINE_DIR

    return fingerprint(UNet2DConditionModel.from_pretrained(MINI_PIPELINE_DIR / "unet"))
