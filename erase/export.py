"""Writing results: the erased UNet in diffusers format, the patch, and erase.json — atomically.

Everything is written into a hidden sibling folder `.<out>.<pid>.partial` and renamed into place at the end, so
an interrupted run leaves either the previous folder or the complete new one, never a half-written checkpoint.
A lock file `.<out>.lock` beside the destination keeps a second run from writing it meanwhile. What a killed
process leaves behind carries its pid, so the next run for the same destination recognises it and cleans up.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .concepts import concepts_from_record
from .edits import PATCH_FORMAT, MaskEdit, fingerprint
from .errors import EraseError

PATCH_NAME = "patch.safetensors"
RECORD_NAME = "erase.json"
REPORT_NAME = "report.json"
RUN_MARKERS = (RECORD_NAME, REPORT_NAME)  # a folder holding one of these was written by an erase run
MB = 2**20

written: list[Path] = []
"""Outputs this process has put in place, in order: what is on disk when a run is interrupted."""
_reserved: set[Path] = set()


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work is done, an output that cannot be written or would clobber what is not a run."""
    if not str(out).strip():
        raise EraseError("--out is empty: pass a folder path, e.g. --out runs/my-run")
    out = Path(out).expanduser()
    where = Path(os.path.abspath(out))
    if where == Path.cwd() or where in Path.cwd().parents:
        raise EraseError(f"--out {out} is the working folder or holds it: choose a new folder, e.g. --out runs/my-run")
    if not where.parent.is_dir():
        raise EraseError(f"the folder {out.parent} does not exist: create it first or choose another --out")
    if out.exists() and not out.is_dir():
        raise EraseError(f"--out {out} is a file: choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise EraseError(f"--out {out} exists and is not empty: choose another folder or pass --overwrite")
        if not any((out / marker).is_file() for marker in RUN_MARKERS):
            raise EraseError(f"--out {out} holds files that no erase run wrote (no {' or '.join(RUN_MARKERS)}), and "
                             "--overwrite replaces only an earlier run's folder: choose another --out")
    return out


@contextmanager
def reserved(out: Path, overwrite: bool):
    """Hold an exclusive lock on `out` for the block, refusing at once if another run holds it or `out` may not be
    written (checked again now that no other run can write it). Re-entrant."""
    where = Path(os.path.abspath(out))
    if where in _reserved:
        yield
        return
    lock = where.with_name(f".{where.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise EraseError(f"cannot write in {where.parent} ({exc.strerror}): choose another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # the holder removed the file as we opened it
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise EraseError(f"another run is writing {out} right now: wait for it to finish or choose another --out") from None
    _reserved.add(where)
    try:
        _clean_after_dead_runs(where)
        check_output_dir(out, overwrite)
        yield
    finally:
        _reserved.discard(where)
        os.unlink(lock)
        os.close(fd)


def _clean_after_dead_runs(out: Path) -> None:
    """Remove the partial folders of killed runs; put back a previous output a killed run had moved aside."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.(partial|old)")
    for path in sorted(out.parent.iterdir(), key=lambda p: p.name.endswith(".partial")):  # restore .old first
        match = pattern.fullmatch(path.name)
        if not match or _alive(int(match[1])):
            continue
        if match[2] == "old" and not out.exists():
            os.replace(path, out)
            print(f"erase: note: restored {out} from {path.name}, moved aside by process {match[1]}, which was "
                  "killed while replacing it", file=sys.stderr)
        else:
            shutil.rmtree(path)
            print(f"erase: note: removed {path}, left by process {match[1]}, which no longer runs", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


@contextmanager
def atomic_dir(out: Path, overwrite: bool, size: int = 0):
    """Yield a new folder beside `out` (about `size` bytes will go in); on success it replaces `out` in one rename."""
    with reserved(out, overwrite):
        _check_space(out, size)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
        tmp.mkdir()  # the user's umask applies: other users (an A1111 service) can read the checkpoint
        try:
            yield tmp
            _replace(out, tmp)
        except (OSError, SafetensorError) as exc:
            if not _disk_full(exc):
                raise
            raise _no_space(out, size) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written.append(out)


def _replace(out: Path, tmp: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


def _disk_full(exc: Exception) -> bool:
    return getattr(exc, "errno", None) == errno.ENOSPC or "os error 28" in str(exc)  # safetensors: in its message


def _check_space(out: Path, size: int) -> None:
    if shutil.disk_usage(out.parent).free < size:
        raise _no_space(out, size)


def _no_space(out: Path, size: int) -> EraseError:
    short = max(size - shutil.disk_usage(out.parent).free, 0)
    need = f"free {short / MB:.0f} MB (the output takes about {size / MB:.0f} MB)" if short else "free some space"
    return EraseError(f"no space left on device writing {out}: {need} or choose another --out")


def nbytes(*modules) -> int:
    """Bytes of the modules' tensors: about what writing them takes on disk."""
    return sum(t.numel() * t.element_size() for m in modules if m is not None for t in m.state_dict().values())


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def section_pattern(title: str) -> re.Pattern:
    """A Markdown section `## {title}`, up to the next `## ` heading or the end."""
    return re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)


def replace_section(text: str, title: str, body: str) -> str:
    """Markdown `text` with its section `## {title}` replaced by `body` (appended if it has none); the other
    sections stay as they are, so several writers can share one file (BENCHMARKS.md, a report with attacks)."""
    section, pattern = f"## {title}\n\n{body.strip()}\n", section_pattern(title)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    return text.rstrip() + "\n"


def save_patch(path: Path, edit: MaskEdit, metadata: dict) -> None:
    """The edit alone: packed masks plus metadata (format, shapes, fingerprints, method, concepts)."""
    tensors, shapes = edit.to_tensors()
    save_file(tensors, str(path), metadata=encode_header({"format": PATCH_FORMAT, "shapes": shapes, **metadata}))


def encode_header(metadata: dict) -> dict[str, str]:
    """A safetensors header: a map of strings, so values that are not strings are JSON-encoded."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}


def read_patch(path: str | Path) -> tuple[MaskEdit, dict]:
    path = Path(path)
    if not path.is_file():
        raise EraseError(f"patch {path} does not exist: pass the patch.safetensors of an erase run")
    try:

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise EraseError(f"{path} is not a readable safetensors file ({exc}): export the patch again") from exc
    if metadata.get("format") != PATCH_FORMAT:
        raise EraseError(f"{path} is a patch of format {metadata.get('format')!r}, this erase reads {PATCH_FORMAT!r}: "
                         "export it again with this version")
    shapes = read_json(metadata.get("shapes", ""), f"{path} has a corrupt header: its shapes")
    concepts_from_record(read_json(metadata.get("concepts", "[]"), f"{path} has a corrupt header: its concepts"),
                         f"the header of {path}")  # refused now, not after the model has loaded
    if not isinstance(shapes, dict):
        raise EraseError(f"{path} has a corrupt header (shapes is not a mapping): export the patch again")
    return MaskEdit.from_tensors(tensors, shapes), metadata


def read_json(text: str, what: str):
    """Parsed JSON, or one line: `what` (the file or field) is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EraseError(f"{what} is not valid JSON ({exc}): export the run again") from None


def check_patch_base(pipe, patch: str | Path, metadata: dict) -> str:
    """The UNet's fingerprint, after refusing a UNet other than the one the patch was made from."""
    base = fingerprint(pipe.unet)
    if base != metadata.get("base_fingerprint"):
        raise EraseError(f"patch {patch} was made for base {metadata.get('base_fingerprint')}, but this model is {base}: "
                         "apply it to the model it was made from (same weights and dtype)")
    return base


def apply_patch(pipe, patch: str | Path) -> MaskEdit:
    """Apply a saved patch to the pipeline's UNet in place, refusing a UNet other than the patch's base."""
    edit, metadata = read_patch(patch)
    check_patch_base(pipe, patch, metadata)
    edit.apply(pipe.unet)
    return edit
