"""Write one section of BENCHMARKS.md, leaving the sections other scripts own untouched."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

from erase.export import replace_section

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery section is written by the script it names; rerun the script to refresh it.\n"


def update_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the section `## {title}` with `body`, atomically; scripts run side by side take turns
    (a lock file beside it), so neither loses the other's section."""
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = replace_section(path.read_text() if path.exists() else HEADER, title, body)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".BENCHMARKS.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
