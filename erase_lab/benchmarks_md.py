"""Write one section of BENCHMARKS.md, leaving the sections other modules own untouched."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from erase.export import replace_section

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
# The sections in the order the file keeps them, each with what it tells a reader; a new section is appended.
SECTIONS = {
    "Miniature world: methods": "every method on forget sets of 1, 3 and 10 concepts: the table to choose a method by",
    "Miniature world: tuning": "every method's settings chosen the same way, on a validation forget set",
    "Miniature world: where a concept lives": "each method on concepts taught into known neurons and on concepts "
                                              "learnt end to end",
    "Miniature world: attacks": "how often each attack brings an erased concept back, per method: the attack matrix",
    "Miniature world: revival": "the revival attack on FIA's and ConceptPrune's pruned weights, zeros against noise",
    "Miniature world: LoRA rank": "how much of each training method's erasure its LoRA file keeps, by rank",
    "Miniature world: FIA r2/alpha sweep": "FIA's two mask settings on a three-concept forget set",
    "Miniature world: FIA scaling": "FIA's wall time and memory for 1 to 100 concepts",
    "Miniature world: erasure gates": "FIA's gates: each Imagenette class alone, the ten at once, van gogh and nudity",
    "FIA scoring cost (SD1.5 architecture, random weights, CPU)": "FIA's time and memory against plain inference",
    "FIA scoring cost (SD3-medium architecture, random weights, CPU)": "the same on a diffusion transformer (MMDiT)",
    "FIA statistics: threads (SD1.5 architecture, random weights, CPU)": "why FIA's statistics run on one thread",
    "FIA across processes (mini model, 10 concepts, CPU)": "FIA on one process against two",
    "Protocols: generation throughput (CPU)": "a field protocol's images per second on one process against two",
    "Protocols: nudity on the miniature world": "the i2p protocol's NudeNet table for every method's erasure of nudity",
    "Miniature world": "the miniature model's quality and knowledge gates, and how it was trained",
    "Miniature world: the judge on bare places and clothed persons": "what a perfect erasure still scores under the "
                                                                     "mini judge",
    "Package": "the wheel's size and its largest files",
    "Reliability: bad input": "every bad input the command line and the API refuse, run as a user runs it",
    "Loads in ComfyUI": "erase's single files and LoRAs loaded by ComfyUI's own loaders: keys and values",
}


PARTS = {"table": "methods", "scaling": "FIA scaling", "sweep": "FIA r2/alpha sweep", "attack": "attacks",
         "lives": "where a concept lives", "revival": "revival", "erasure-gate": "erasure gates"}


@dataclass(frozen=True)
class World:
    """A shipped miniature model the lab measures ("mini", the UNet; "mini-dit", the MMDiT), and where its rows,
    sections and plot go."""

    name: str
    title: str
    """Its sections' title, and their prefix: "Miniature world: methods"."""
    kind: str
    """How a section's protocol names it."""
    family: str
    """Its denoiser's model family (erase.families)."""
    sampler: str

    def rows(self, kind: str) -> Path:
        """docs/<kind>-<name>.json: methods, attack, sweep, lives, revival, erasure-gate."""
        return ROOT / self.named(kind, "json")

    def named(self, kind: str, suffix: str) -> str:
        """The repository path of its `kind` file, as sections name it: docs/methods-mini.json."""
        return f"docs/{kind}-{self.name}.{suffix}"

    def section(self, part: str) -> str:
        return f"{self.title}: {PARTS[part]}"

    @property
    def plot(self) -> Path:
        return ROOT / self.named("methods", "png")

    @property
    def reproduce(self) -> str:
        return self.command("bench_methods")

    def command(self, module: str) -> str:
        """The command that measures this world's rows with erase_lab.<module>."""
        command = f"HF_HUB_OFFLINE=1 python -m erase_lab.{module}"
        return command if self.name == "mini" else f"{command} --pipeline {self.name}"


WORLDS = {"mini": World("mini", "Miniature world", "miniature model", "unet", "DPM-Solver++"),
          "mini-dit": World("mini-dit", "Miniature SD3 world", "miniature SD3 (MMDiT)", "sd3", "flow-matching Euler")}


def world_of(pipe) -> World:
    """The world whose model family `pipe` is (a trial model's sections are its world's)."""
    from erase.families import family_of

    return next(w for w in WORLDS.values() if w.family == family_of(pipe).name)
def anchor(title: str) -> str:
    """The link GitHub gives the heading `## {title}`."""
    return "#" + re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


# A word that starts a list item, a heading or a quote when a line starts with it.
MARKDOWN_MARKER = re.compile(r"[-+*>]|#{1,6}|\d{1,9}[.)]")


def wrapped(paragraph: str, width: int = 120) -> str:
    """`paragraph` in lines of at most about `width` characters; a word Markdown would read as a marker at the start of
    a line stays at the end of the line before."""
    lines: list[str] = []
    for word in paragraph.split():
        if lines and (len(lines[-1]) + 1 + len(word) <= width or MARKDOWN_MARKER.fullmatch(word)):
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


HEADER = "\n".join([
    "# Benchmarks", "",
    wrapped("What erase measures, one section per benchmark: its table(s), one paragraph on how they were measured "
            "(model, prompts, seeds, sampler, guidance, judge, what each column means), and the command that measures "
            "them again from a checkout, `python -m erase_lab.<module>`, which rewrites its section. Why the presets "
            "and the miniature world are what they are, and what each trial showed: "
            "[docs/rationale.md](docs/rationale.md)."), "",
    *[f"- [{title}]({anchor(title)}): {about}" for title, about in SECTIONS.items()], ""])


@contextlib.contextmanager
def turn(path: Path):
    """Hold the lock file beside `path`: modules run side by side take turns at reading and rewriting it."""
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace the section `## {title}` with `body` (a new one goes where SECTIONS lists it), atomically; modules run
    side by side take turns, so neither loses the other's section."""
    with turn(path):
        text = path.read_text() if path.exists() else HEADER
        write_atomically(path, replace_section(in_place(text, title), title, body))


def in_place(text: str, title: str) -> str:
    """`text` with an empty `## {title}` before the first section SECTIONS lists after it, where it has no such
    section yet (replace_section would append it at the end), under the index of every section SECTIONS lists."""
    names = list(SECTIONS)
    if f"\n## {title}\n" in text or title not in names:
        return text
    later = [text.index(f"\n## {name}\n") for name in names[names.index(title) + 1 :] if f"\n## {name}\n" in text]
    text = text if not later else text[: min(later)] + f"\n## {title}\n\n" + text[min(later) :]
    return HEADER + text[text.index("\n## ") :]  # the index lists the new section too


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
        """A paragraph above the table when some rows were measured on another model, or at another guidance, than
        now (none when every row is current)."""
        stale = [r for r in self.rows if not self.current(r)]
        if not stale:
            return []
        shipped = f"the shipped UNet {self.model.removeprefix('sha256:')[:12]}…"
        if "guidance" in self.stamp:
            shipped += f" at guidance {self.stamp['guidance']:g}"
        return [(f"_{len(stale)} of these {len(self.rows)} rows were measured on an earlier mini model or at another "
                 f"guidance (not {shipped}) and are marked †; `{command}` measures them again._")]

    def mark(self, row: dict) -> str:
        return "" if self.current(row) else " †"


def mini_model(name: str = "mini") -> str:
    """The fingerprint of a shipped miniature model's denoiser ("mini": the UNet, "mini-dit": the MMDiT), which
    stamps the rows measured on it."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from erase.edits import fingerprint
    from erase.profile import EMBEDDED

    if name == "mini":
        return fingerprint(UNet2DConditionModel.from_pretrained(EMBEDDED[name] / "unet"))
    return fingerprint(SD3Transformer2DModel.from_pretrained(EMBEDDED[name] / "transformer"))


def mini_version(name: str = "mini") -> str:
    """A shipped miniature model's version ("mini-2"), as its profile names it."""
    from erase.profile import profile_of

    return profile_of(name).describe()


def model_sentence(model: str | None = None, shipped: str = "mini") -> str:
    """A protocol's first sentence: the model its rows were measured on (default: the shipped miniature model
    `shipped`, "mini" or "mini-dit")."""
    return f"Model: {model or f'{mini_version(shipped)}, the shipped {WORLDS[shipped].kind}'}."


def section_body(tables: list[str], protocol: str, reproduce: str, status: list[str] = ()) -> str:
    """A section as every module writes it: what is stale or missing (if anything), its table(s), one paragraph on
    how they were measured, then the command that measures them again; its prose in lines of about 120 characters."""
    return "\n\n".join([*map(wrapped, status), *tables, wrapped(protocol), wrapped(f"Reproduce: {reproduce}")])


def not_measured(missing: list[str]) -> list[str]:
    """A status paragraph naming the rows not measured yet (none when every row is there)."""
    return [f"_Not measured yet: {', '.join(missing)}._"] if missing else []
