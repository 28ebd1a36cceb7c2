"""Every bad input erase refuses (command line and API), run as a user runs it, with a table: case, exit code, first
line, files written.

    HF_HUB_OFFLINE=1 python -m erase_lab.bad_inputs       # each CLI case in its own `python -m erase.cli` process

Each case builds its inputs in a folder of its own and must be refused with exit code 2, one line on stderr
(no traceback) and nothing written. tests/test_bad_input.py runs the same table through erase.cli.main().
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "prompts_per_concept=2", "--set", "saliency_steps=2", "--quiet"]


@dataclass
class Case:
    name: str
    argv: Callable[[Path, Path], list[str]]
    """Builds the case's inputs in its folder (second argument) and returns the command's arguments; the first
    argument is the shared folder with `model/` (a tiny SD pipeline), `lcm/` (one without a single-file layout) and
    `run/` (an erase run of model/)."""
    expect: str
    """A fragment of the one line the case must be refused with."""


def erase_args(shared: Path, case: Path, *extra: str, model: str | None = None) -> list[str]:
    return ["--concepts", "church", "--model", model or str(shared / "model"), "--out", str(case / "out"), *FAST,
            *extra]


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def partial_model(shared: Path, case: Path) -> str:
    """model_index.json and unet/ only, as a copy that stopped half-way leaves it."""
    folder = case / "partial"
    write(folder / "model_index.json", (shared / "model" / "model_index.json").read_text())
    for item in (shared / "model" / "unet").iterdir():
        (folder / "unet").mkdir(exist_ok=True)
        (folder / "unet" / item.name).write_bytes(item.read_bytes())
    return str(folder)


def pickled_model(shared: Path, case: Path) -> str:
    """The model with its UNet weights only as a .bin (a stand-in: it is refused by name, never unpickled)."""
    folder = case / "pickled"
    for item in (shared / "model").rglob("*"):
        if item.is_file():
            target = folder / item.relative_to(shared / "model")
            target.parent.mkdir(parents=True, exist_ok=True)
            if item.name == "diffusion_pytorch_model.safetensors" and item.parent.name == "unet":
                target = target.with_suffix(".bin")
            target.write_bytes(item.read_bytes())
    return str(folder)


def damaged_run(shared: Path, case: Path, change: Callable[[dict], object]) -> str:
    """A copy of the shared run whose erase.json `change` rewrites (a dict to write as JSON, or raw text)."""
    folder = case / "run"
    folder.mkdir()
    for item in (shared / "run").iterdir():
        if item.is_file():
            (folder / item.name).write_bytes(item.read_bytes())
    record = change(json.loads((folder / "erase.json").read_text()))
    (folder / "erase.json").write_text(record if isinstance(record, str) else json.dumps(record))
    return str(folder)


def locked_out(case: Path) -> str:
    """--out whose lock another run holds (an open file description of our own: flock refuses it too)."""
    out = case / "out"
    fd = os.open(case / ".out.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    HELD.append(fd)
    return str(out)


HELD: list[int] = []  # lock files the current case holds, closed after it


def attack_args(shared: Path, case: Path, *extra: str) -> list[str]:
    return ["attack", str(shared / "run"), "--model", str(shared / "model"), "--out", str(case / "report"), "--quiet",
            *extra]


def protocol_args(shared: Path, case: Path, protocol: str, *extra: str) -> list[str]:
    out = [] if "--out" in extra else ["--out", str(case / "out")]
    return ["evaluate", str(shared / "run"), "--model", str(shared / "model"), "--protocol", protocol, *out, *extra,
            "--quiet"]


def code_pickle(case: Path) -> str:
    """A .pth file whose unpickling would call os.system: what weights_only refuses."""
    path = case / "inception.pth"
    path.write_bytes(b"\x80\x04cos\nsystem\nq\x00.")
    return str(path)


def user_folder(case: Path) -> str:
    folder = case / "mine"
    write(folder / "notes.txt", "a file of the user's")
    return str(folder)


def patch_with_header(shared: Path, case: Path, **header: str) -> str:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    patch = shared / "run" / "patch.safetensors"
    with safe_open(str(patch), framework="pt") as f:
        metadata = dict(f.metadata(), **header)
    save_file(load_file(str(patch)), str(case / "patch.safetensors"), metadata=metadata)
    return str(case / "patch.safetensors")


def patch_with_tensors(shared: Path, case: Path, change: Callable[[dict], dict]) -> str:
    """A copy of the shared run's patch whose tensors `change` rewrites (its header kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    patch = shared / "run" / "patch.safetensors"
    with safe_open(str(patch), framework="pt") as f:
        metadata = f.metadata()
    save_file(change(load_file(str(patch))), str(case / "patch.safetensors"), metadata=metadata)
    return str(case / "patch.safetensors")


def values(change: Callable) -> Callable[[dict], dict]:
    """A patch change that rewrites the new values of every edited weight."""
    return lambda tensors: {k: change(v) if k.endswith(":values") else v for k, v in tensors.items()}


def apply_args(shared: Path, case: Path, patch: str, *extra: str) -> list[str]:
    return ["apply", "--patch", patch, "--model", str(shared / "model"), "--out", str(case / "out"), "--quiet", *extra]


def linked_out(case: Path, target: Path) -> str:
    """--out that is a symbolic link to `target`."""
    (case / "link").symlink_to(target, target_is_directory=True)
    return str(case / "link")


def planted_lock(case: Path) -> str:
    """--out whose lock file is a symbolic link planted to a file of the user's elsewhere."""
    (case / ".out.lock").symlink_to(case / "victim")
    return str(case / "out")


def foreign_checkpoint(case: Path) -> str:
    """A checkpoint_dir whose checkpoint.pt is not one of erase's (a plain list)."""
    import torch

    (case / "ckpt").mkdir()
    torch.save([1, 2, 3], case / "ckpt" / "checkpoint.pt")
    return str(case / "ckpt")


def billion_laughs(levels: int = 9) -> str:
    """Nine lists of nine aliases of the list before: 9⁹ values from 90 lines' worth of text."""
    lines = ["- &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"- &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines)


def indented(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


CATALOG_WITH_UNKNOWN_SLOT = """kinds:
  thing: {slot: place, concept_templates: ["a {nonexistent} {concept}"], base_templates: ["a {place}"], fillers: [road]}
"""

CASES = [
    Case("--set value not YAML", lambda s, c: erase_args(s, c, "--set", "r2=["), "not valid YAML"),
    Case("--config file not YAML", lambda s, c: erase_args(s, c, "--config", write(c / "bad.yaml", "r2: [")),
         "not valid YAML"),
    Case("--catalog file not YAML", lambda s, c: erase_args(s, c, "--catalog", write(c / "bad.yaml", "kinds: [")),
         "not valid YAML"),
    Case("catalog template names an unknown slot",
         lambda s, c: erase_args(s, c, "--catalog", write(c / "cat.yaml", CATALOG_WITH_UNKNOWN_SLOT)),
         "slot {nonexistent}"),
    Case("--model folder with only some components", lambda s, c: erase_args(s, c, model=partial_model(s, c)),
         "lacks the"),
    Case("--model folder with pickle weights only", lambda s, c: erase_args(s, c, model=pickled_model(s, c)),
         "only as a pickle"),
    Case("--model path missing", lambda s, c: erase_args(s, c, model=str(c / "no-such-model")), "does not exist"),
    Case("--single-file for a model without one", lambda s, c: erase_args(s, c, "--single-file", model=str(s / "lcm")),
         "--single-file asked for a file this model cannot have"),
    Case("--device foo", lambda s, c: erase_args(s, c, "--device", "foo"), "unknown device"),
    Case("--device meta", lambda s, c: erase_args(s, c, "--device", "meta"), "cannot run a model"),
    Case("--device cpu:0 --dtype float16", lambda s, c: erase_args(s, c, "--device", "cpu:0", "--dtype", "float16"),
         "float16 is not supported"),
    Case('--out ""', lambda s, c: [*erase_args(s, c), "--out", ""], "--out is empty"),
    Case("--out . --overwrite", lambda s, c: [*erase_args(s, c), "--out", ".", "--overwrite"], "working folder"),
    Case("--out /proc/x", lambda s, c: [*erase_args(s, c), "--out", "/proc/x"], "cannot write in /proc"),
    Case("--out /sys/x", lambda s, c: [*erase_args(s, c), "--out", "/sys/x"], "cannot write in /sys"),
    Case("--out a user's folder --overwrite", lambda s, c: [*erase_args(s, c), "--out", user_folder(c), "--overwrite"],
         "no erase run wrote"),
    Case("--out locked by another run", lambda s, c: [*erase_args(s, c), "--out", locked_out(c)],
         "another run is writing"),
    Case("--set guidance_scale=.nan", lambda s, c: erase_args(s, c, "--set", "guidance_scale=.nan"),
         "not a finite number"),
    Case("--set guidance_scale=abc", lambda s, c: erase_args(s, c, "--set", "guidance_scale=abc"),
         "not a finite number"),
    Case("--method salun --set lr=.inf", lambda s, c: [*erase_args(s, c)[:6], "--method", "salun", "--set", "lr=.inf"],
         "not a finite number"),
    Case("--set resolution=7", lambda s, c: erase_args(s, c, "--set", "resolution=7"), "not a multiple of"),
    Case("--set resolution=100000", lambda s, c: erase_args(s, c, "--set", "resolution=100000"), "needs more than"),
    Case("concept longer than the text encoder reads",
         lambda s, c: [*erase_args(s, c), "--concepts", "object:" + " ".join(["word"] * 80)], "too long for this model"),
    Case("--eval --clip NoSuchArch", lambda s, c: erase_args(s, c, "--eval", "--clip", "NoSuchArch"),
         "unknown CLIP model"),
    Case("--eval --eval-set bogus=1", lambda s, c: erase_args(s, c, "--eval", "--eval-set", "bogus=1"),
         "unknown setting 'bogus'"),
    Case("evaluate RUN --out non-empty REPORT",
         lambda s, c: ["evaluate", str(s / "run"), "--model", str(s / "model"), "--out", user_folder(c), "--quiet"],
         "is not empty"),
    Case("evaluate RUN, erase.json not JSON",
         lambda s, c: ["evaluate", damaged_run(s, c, lambda r: "{not json"), "--model", str(s / "model"), "--quiet"],
         "not valid JSON"),
    Case("evaluate RUN, erase.json without concepts",
         lambda s, c: ["evaluate", damaged_run(s, c, lambda r: {k: v for k, v in r.items() if k != "concepts"}),
                       "--model", str(s / "model"), "--quiet"], "does not list its concepts"),
    Case("evaluate RUN, erase.json with unknown keys",
         lambda s, c: ["evaluate", damaged_run(s, c, lambda r: dict(r, concepts=[dict(r["concepts"][0], colour=1)])),
                       "--model", str(s / "model"), "--quiet"], "does not list its concepts"),
    Case("attack RUN --set bogus=1", lambda s, c: attack_args(s, c, "--set", "bogus=1"), "unknown setting 'bogus'"),
    Case("attack RUN --set tokens=0", lambda s, c: attack_args(s, c, "--set", "tokens=0"), "tokens=0 is out of range"),
    Case("attack RUN --kind nope", lambda s, c: attack_args(s, c, "--kind", "nope"), "unknown attack kind 'nope'"),
    Case("attack RUN --concepts dog (not erased)", lambda s, c: attack_args(s, c, "--concepts", "dog"),
         "was not erased by this run"),
    Case("attack RUN --out RUN", lambda s, c: attack_args(s, c, "--out", str(s / "run")), "is a run folder"),
    Case("attack RUN --out non-empty folder", lambda s, c: attack_args(s, c, "--out", user_folder(c)),
         "holds files that no erase run wrote"),
    Case("attack RUN, erase.json not JSON",
         lambda s, c: ["attack", damaged_run(s, c, lambda r: "{not json"), "--model", str(s / "model"), "--quiet"],
         "not valid JSON"),
    Case("--lora 4 with a masking method", lambda s, c: erase_args(s, c, "--lora", "4"), "sparse mask is not low-rank"),
    Case("--lora 0", lambda s, c: erase_args(s, c, "--lora", "0"), "is not a rank"),
    Case("apply a FIA patch --lora 4",
         lambda s, c: ["apply", "--patch", str(s / "run" / "patch.safetensors"), "--model", str(s / "model"),
                       "--out", str(c / "out"), "--lora", "4", "--quiet"], "sparse mask is not low-rank"),
    Case("apply, patch header concepts not JSON",
         lambda s, c: ["apply", "--patch", patch_with_header(s, c, concepts="[{"), "--model", str(s / "model"),
                       "--out", str(c / "out"), "--quiet"], "corrupt header"),
    # Outputs never destroy inputs, and links are not followed.
    Case("evaluate RUN --out RUN --overwrite",
         lambda s, c: ["evaluate", str(s / "run"), "--model", str(s / "model"), "--out", str(s / "run"), "--overwrite",
                       "--quiet"], "is the run folder"),
    Case("--model RUN/x.safetensors --out RUN --overwrite",
         lambda s, c: erase_args(s, c, "--model-config", str(s / "model"), "--out", str(s / "run"), "--overwrite",
                                 model=str(s / "run" / "run.safetensors")), "holds --model"),
    Case("apply --out the patch's folder --overwrite",
         lambda s, c: apply_args(s, c, str(s / "run" / "patch.safetensors"), "--out", str(s / "run"), "--overwrite"),
         "holds --patch"),
    Case("--out inside --model", lambda s, c: erase_args(s, c, "--out", str(s / "model" / "erased")),
         "lies inside --model"),
    Case("--out holds --config --overwrite",
         lambda s, c: erase_args(s, c, "--config", write(c / "mine" / "fia.yaml", "r2: 0.03"), "--out", str(c / "mine"),
                                 "--overwrite"), "holds --config"),
    Case("--out a symbolic link --overwrite",
         lambda s, c: [*erase_args(s, c), "--out", linked_out(c, s / "run"), "--overwrite"], "is a symbolic link"),
    Case("--out lock file a planted symbolic link", lambda s, c: [*erase_args(s, c), "--out", planted_lock(c)],
         "which erase does not follow"),
    Case("--out name too long", lambda s, c: [*erase_args(s, c), "--out", str(c / ("n" * 300))],
         "too long for the file system"),
    # A run folder is checked as a whole; a patch's header and values before any weight changes.
    Case("evaluate RUN whose patch is another run's",
         lambda s, c: ["evaluate", damaged_run(s, c, lambda r: dict(r, concepts=[dict(r["concepts"][0], name="dog",
                                                                                       text="dog")])),
                       "--model", str(s / "model"), "--quiet"], "is not this run's patch"),
    Case("attack RUN whose erase.json names another erased model",
         lambda s, c: ["attack", damaged_run(s, c, lambda r: dict(r, erased_fingerprint="sha256:" + "0" * 64)),
                       "--model", str(s / "model"), "--quiet"], "is not this run's patch"),
    Case("apply, patch values NaN", lambda s, c: apply_args(s, c, patch_with_tensors(s, c, values(lambda v: v * float("nan")))),
         "are not all finite"),
    Case("apply, patch values one short", lambda s, c: apply_args(s, c, patch_with_tensors(s, c, values(lambda v: v[:-1]))),
         "one per bit set in its mask"),
    Case("apply, patch header shape not a list",
         lambda s, c: apply_args(s, c, patch_with_header(s, c, shapes='{"conv_in.weight": "ab"}')),
         "not a list of positive whole numbers"),
    Case("apply, patch header without a method", lambda s, c: apply_args(s, c, patch_with_header(s, c, method="")),
         "corrupt header"),
    # The field's protocols: every input checked before the model loads, another folder never written into.
    Case("evaluate RUN --protocol i2p, prompt file without a prompt column",
         lambda s, c: protocol_args(s, c, "i2p", "--prompts", write(c / "p.csv", "text_column,seed\nx,1\n")),
         "has no prompt column"),
    Case("evaluate RUN --protocol i2p --out a folder of the user's",
         lambda s, c: protocol_args(s, c, "i2p", "--prompts", write(c / "p.txt", "a cat\n"), "--out", user_folder(c)),
         "no protocol run wrote"),
    Case("evaluate RUN --protocol coco, Inception file a pickle that runs code",
         lambda s, c: protocol_args(s, c, "coco", "--prompts", write(c / "p.txt", "a cat\n"), "--eval-set",
                                    f"inception={code_pickle(c)}"), "could not be read as weights"),
    Case("evaluate RUN --protocol imagenette --prompts FILE",
         lambda s, c: protocol_args(s, c, "imagenette", "--prompts", write(c / "p.txt", "a cat\n")),
         "makes its own prompts"),
    # Tracebacks that became refusals.
    Case("--catalog YAML alias bomb",
         lambda s, c: erase_args(s, c, "--catalog", write(c / "bomb.yaml", "neutral:\n" + indented(billion_laughs()))),
         "write the values out instead of nesting aliases"),
    Case("--config YAML alias bomb",
         lambda s, c: erase_args(s, c, "--config", write(c / "bomb.yaml", "r2:\n" + indented(billion_laughs()))),
         "uses YAML aliases that expand it to"),
    Case("--method uce, anchor equal to the concept",
         lambda s, c: ["--method", "uce", "--concepts", "church=>church", "--model", str(s / "model"), "--out",
                       str(c / "out"), "--quiet"], "has itself as anchor"),
    Case("training checkpoint not erase's",
         lambda s, c: ["--concepts", "church", "--method", "esd", "--model", str(s / "model"), "--out", str(c / "out"),
                       "--quiet", "--set", f"checkpoint_dir={foreign_checkpoint(c)}"], "is not a checkpoint of erase"),
]


def api_cases(pipe) -> list[tuple[str, Callable[[], object], str]]:
    """(name, call, fragment) for the Python API: each call must raise EraseError with the fragment."""
    import erase

    return [
        ("erase(object(), ...)", lambda: erase.erase(object(), "church"), "not a model erase can edit"),
        ("erase(pipe.unet, ...)", lambda: erase.erase(pipe.unet, "church"), "not a model erase can edit"),
        ("erase(None, ...)", lambda: erase.erase(None, "church"), "not a model erase can edit"),
        ("erase(pipe, None)", lambda: erase.erase(pipe, None), "a list of concept names"),
        ("erase(pipe, [1, 2])", lambda: erase.erase(pipe, [1, 2]), "a list of concept names"),
        ("erase(pipe, [None])", lambda: erase.erase(pipe, [None]), "a list of concept names"),
        ("erase(pipe, ..., config=123)", lambda: erase.erase(pipe, "church", config=123), "config must be"),
        ("erase(pipe, ..., guidance_scale=nan)", lambda: erase.erase(pipe, "church", guidance_scale=float("nan")),
         "not a finite number"),
    ]


def prepare(shared: Path):
    """model/ (a tiny SD pipeline saved as diffusers), lcm/ and run/ (FIA on model/) in `shared`; returns the pipeline."""
    import erase

    from .tiny import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.save_pretrained(shared / "model", safe_serialization=True)
    # A UNet with a guidance embedding (as LCM-distilled ones have), which no single file holds.
    tiny_pipeline(time_cond_proj_dim=8).save_pretrained(shared / "lcm", safe_serialization=True)
    erase.erase(pipe, "church", progress=False, prompts_per_concept=2, saliency_steps=2).save(shared / "run")
    return pipe


def files(folder: Path) -> set[str]:
    """Every path below `folder` with its size: what a case must not change."""
    return {f"{p.relative_to(folder)}:{p.stat().st_size if p.is_file() else 'dir'}" for p in folder.rglob("*")}


def release_locks() -> None:
    while HELD:
        os.close(HELD.pop())


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "erase.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True)
    return done.returncode, done.stderr


def verdict(code: int, stderr: str, expect: str, written: set[str]) -> str:
    lines = stderr.strip().splitlines()
    ok = code == 2 and len(lines) == 1 and "Traceback" not in stderr and expect in stderr and not written
    return "refused, one line, nothing written" if ok else "NOT REFUSED AS PROMISED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-record", action="store_true", help="print the table without writing BENCHMARKS.md")
    args = parser.parse_args()
    shared = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    try:
        rows = run_cases(shared)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    table = markdown(rows)
    print(table)
    if not args.no_record:
        from .benchmarks_md import update_section

        update_section(SECTION, section(rows, table))
    return 0 if all(row[-1].startswith("refused") for row in rows) else 1


def run_cases(shared: Path) -> list[tuple]:
    """Every case with its inputs under `shared`: (case, exit, first line, files written, verdict) rows."""
    pipe = prepare(shared)
    rows = []
    for i, case in enumerate(CASES):
        folder = shared / f"case{i}"
        folder.mkdir()
        argv = case.argv(shared, folder)
        before = files(shared)
        code, stderr = run_cli(argv, folder)
        release_locks()
        written = files(shared) ^ before
        rows.append((case.name, code, (stderr.strip().splitlines() or [""])[0], written,
                     verdict(code, stderr, case.expect, written)))
    from erase.errors import EraseError

    for name, call, expect in api_cases(pipe):
        try:
            call()
            rows.append((name, 0, "accepted", set(), "NOT REFUSED AS PROMISED"))
        except EraseError as exc:
            rows.append((name, "EraseError", str(exc), set(), verdict(2, str(exc), expect, set())))
    return rows


def markdown(rows: list[tuple]) -> str:
    lines = ["| case | exit | first line | written | verdict |", "|---|---|---|---|---|"]
    for name, code, line, written, result in rows:
        shown = line.replace(str(Path(tempfile.gettempdir())), "…").replace("|", "\\|")[:150]
        lines.append(f"| {name} | {code} | {shown} | {', '.join(sorted(written)) or '–'} | {result} |")
    return "\n".join(lines)


SECTION = "Reliability: bad input"


def section(rows: list[tuple], table: str) -> str:
    from .benchmarks_md import section_body

    held = sum(row[-1].startswith("refused") for row in rows)
    protocol = (f"{held} of {len(rows)} cases held: each command-line case runs as a user runs it, in its own "
                "`python -m erase.cli` process, against a tiny Stable Diffusion pipeline saved as a folder and an FIA run "
                "of it, with its inputs built in a folder of its own; it holds when it exits 2 with one line on stderr "
                "(no traceback) that names the problem and the fix, and writes, changes and deletes nothing in those "
                "folders. The API cases hold when they raise EraseError with the expected message. Paths in the first "
                "lines are shortened to …. tests/test_bad_input.py runs the same table through erase.cli.main(); the "
                "cache, run-folder, output and YAML cases that need an environment (ERASE_CACHE, a read-only HOME, a "
                "full disk, a file-name limit) are tested in tests/test_cache.py, test_run_folder.py, test_outputs.py "
                "and test_reliability.py.")
    return section_body([table], protocol, "`HF_HUB_OFFLINE=1 python -m erase_lab.bad_inputs`")


if __name__ == "__main__":
    sys.exit(main())
