"""Writing results: the erased UNet in diffusers format, the patch, and erase.json — atomically.

Everything is written into a hidden sibling folder `.<out>.<pid>.partial` and renamed into place at the end, so
an interrupted run leaves either the previous folder or the complete new one, never a half-written checkpoint.
A lock file `.<out>.lock` beside the destination keeps a second run from writing it meanwhile. What a killed
process leaves behind carries its pid, so the next run for the same destination recognises it and cleans up.
No link is followed: a linked destination or lock file is refused, a linked leftover moved or removed itself. The
files get the permissions the user's umask gives, as the folders do.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
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


def check_output_dir(out: str | Path, overwrite: bool, reads: dict[str, str | Path | None] | None = None,
                     report_of: Path | None = None) -> Path:
    """Refuse, before any work is done, an output that cannot be written, would clobber what is not a run, or
    would replace or change what the command reads. reads: {what the user named, e.g. '--model': its path}, the
    command's inputs; values that are no path on disk (a hub id, 'mini') are skipped. report_of: the run folder
    whose report this is, which the output may lie inside (evaluate and attack write <run>/report)."""
    if not str(out).strip():
        raise EraseError("--out is empty: pass a folder path, e.g. --out runs/my-run")
    out = Path(out).expanduser()
    where = Path(os.path.abspath(out))
    if where == Path.cwd() or where in Path.cwd().parents:
        raise EraseError(f"--out {out} is the working folder or holds it: choose a new folder, e.g. --out runs/my-run")
    if not _is_dir(where.parent):
        raise EraseError(f"the folder {out.parent} does not exist: create it first or choose another --out")
    _check_name_length(where)
    if out.is_symlink():
        raise EraseError(f"--out {out} is a symbolic link (to {os.path.realpath(out)}), which erase does not follow: "
                         "pass the folder it points to, or another --out")
    _check_keeps_inputs(out, reads or {}, report_of)
    if out.exists() and not out.is_dir():
        raise EraseError(f"--out {out} is a file: choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise EraseError(f"--out {out} exists and is not empty: choose another folder or pass --overwrite")
        if not any((out / marker).is_file() for marker in RUN_MARKERS):
            raise EraseError(f"--out {out} holds files that no erase run wrote (no {' or '.join(RUN_MARKERS)}), and "
                             "--overwrite replaces only an earlier run's folder: choose another --out")
    return out


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name in the path too long for the file system: no such folder can exist
        return False


def _sibling(out: Path, suffix: str) -> Path:
    """A hidden name beside `out` for what writing it takes: its lock, and this process's partial and old folders."""
    return out.with_name(f".{out.name}.{suffix}")


def _check_name_length(out: Path) -> None:
    """Refuse an output whose name, or a name erase derives from it, the file system would refuse only when that
    file is written: the partial folder beside it, or in it a LoRA (<name>-lora-r<rank>.safetensors, as lora.py
    names it; a rank of up to five digits)."""
    try:
        limit = os.pathconf(out.parent, "PC_NAME_MAX")
    except (OSError, ValueError):  # the file system does not say: the common limit
        limit = 255
    derived = (_sibling(out, f"{os.getpid()}.partial").name, f"{out.name}-lora-r99999.safetensors")
    longest = max(len(os.fsencode(name)) for name in derived)
    if longest > limit:
        extra = longest - len(os.fsencode(out.name))
        raise EraseError(f"--out name {out.name[:40]}… is too long for the file system of {out.parent}: erase derives "
                         f"names up to {extra} bytes longer from it and the file system allows {limit}: choose a "
                         f"name of at most {limit - extra} bytes")


def _check_keeps_inputs(out: Path, reads: dict[str, str | Path | None], report_of: Path | None) -> None:
    """Refuse an output that is an input, holds one, or lies inside an input folder (other than `report_of`):
    replacing it would delete what the command reads, writing into it would change it. Compared by real path."""
    target = Path(os.path.realpath(out))
    home = report_of and Path(os.path.realpath(report_of))
    for what, value in reads.items():
        if value is None or not Path(value).expanduser().exists():
            continue
        read = Path(os.path.realpath(Path(value).expanduser()))
        relation = ("is" if target == read else "holds" if target in read.parents else
                    "lies inside" if read.is_dir() and read in target.parents and read != home else None)
        if relation:
            raise EraseError(f"--out {out} {relation} {what} {value}, which this command reads: choose an --out "
                             "outside it")


@contextmanager
def reserved(out: Path, overwrite: bool):
    """Hold an exclusive lock on `out` for the block, refusing at once if another run holds it or `out` may not be
    written (checked again now that no other run can write it). Re-entrant."""
    where = Path(os.path.abspath(out))
    if where in _reserved:
        yield
        return
    lock = _sibling(where, "lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise EraseError(f"the lock file {lock} is a symbolic link, which erase does not follow (it writes a plain "
                             "file there): remove the link, or choose another --out") from None
        raise EraseError(f"cannot write in {where.parent} ({exc.strerror}): choose another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.lstat(lock).st_ino:  # the holder removed the file as we opened it
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
    """Remove the partial folders of killed runs; put back a previous output a killed run had moved aside. Those of a
    process that still runs are left alone. Links among them are moved or removed themselves, never followed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.(partial|old)")
    for path in sorted(out.parent.iterdir(), key=lambda p: p.name.endswith(".partial")):  # restore .old first
        match = pattern.fullmatch(path.name)
        if not match:
            continue
        if process_alive(int(match[1])):
            print(f"erase: note: left {path} alone: process {match[1]}, which wrote it, still runs", file=sys.stderr)
        elif match[2] == "old" and not os.path.lexists(out):
            os.replace(path, out)
            print(f"erase: note: restored {out} from {path.name}, moved aside by process {match[1]}, which was "
                  "killed while replacing it", file=sys.stderr)
        else:
            _remove(path)
            print(f"erase: note: removed {path}, left by process {match[1]}, which no longer runs", file=sys.stderr)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs, other than this one: we hold the lock, so what carries our own pid was left by
    an earlier process that had it (a container's processes start from the same pids)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _remove(path: Path) -> None:
    """Delete a folder, or a file or link itself (a link is never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextmanager
def atomic_dir(out: Path, overwrite: bool, size: int = 0):
    """Yield a new folder beside `out` (about `size` bytes will go in); on success it replaces `out` in one rename."""
    with reserved(out, overwrite):
        _check_space(out, size)
        tmp = _sibling(out, f"{os.getpid()}.partial")
        tmp.mkdir()  # the user's umask applies: other users (an A1111 service) can read the checkpoint
        try:
            yield tmp
            _follow_umask(tmp)
            _replace(out, tmp)
        except (OSError, SafetensorError) as exc:
            if not disk_full(exc):
                raise
            raise _no_space(out, size) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written.append(out)


def _follow_umask(folder: Path) -> None:
    """Give every file in `folder` the permissions the user's umask gives a new file: those of the folder, which
    mkdir made under that umask, without the execute bits (safetensors writes its files 0600 whatever the umask)."""
    mode = stat.S_IMODE(folder.stat().st_mode) & 0o666
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), mode)


def _replace(out: Path, tmp: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = _sibling(out, f"{os.getpid()}.old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


def disk_full(exc: Exception) -> bool:
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
    return re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)


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


PATCH_FIELDS = {"format": str, "shapes": dict, "base_fingerprint": str, "erased_fingerprint": str, "method": str,
                "concepts": list, "erase_version": str}
"""The fields of a patch's header (docs/PATCH_FORMAT.md), each required, and their types once decoded."""
RUN_FIELDS = ("method", "concepts", "base_fingerprint", "erased_fingerprint")
"""What a run's patch header and its erase.json both say, and must agree on."""
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
JSON_TYPES = {str: "a string", dict: "an object", list: "a list"}


def read_patch(path: str | Path) -> tuple[MaskEdit, dict]:
    """A saved patch's edit and its header (shapes and concepts decoded), every field and tensor checked: anything
    malformed, or values that are not finite, refused in one line before a model is needed. What needs the model
    (the weights' names, shapes and dtype) is checked by check_patch_base."""
    path = Path(path)
    if not path.is_file():
        raise EraseError(f"patch {path} does not exist: pass the patch.safetensors of an erase run")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise EraseError(f"{path} is not a readable safetensors file ({exc}): export the patch again") from exc
    header = patch_header(path, metadata)
    return MaskEdit.from_tensors(tensors, header["shapes"], f"patch {path}"), header


def patch_header(path: Path, metadata: dict[str, str]) -> dict:
    """The header's fields decoded, each refused in one line if missing or of the wrong type."""
    if metadata.get("format") != PATCH_FORMAT:
        raise EraseError(f"{path} is a patch of format {metadata.get('format')!r}, this erase reads {PATCH_FORMAT!r}: "
                         "export it again with this version")
    header = {}
    for key, kind in PATCH_FIELDS.items():
        if key not in metadata:
            raise _corrupt_header(path, f"it has no {key}")
        value = metadata[key] if kind is str else read_json(metadata[key], f"{path} has a corrupt header: its {key}")
        if not isinstance(value, kind) or (kind is str and not value):
            raise _corrupt_header(path, f"{key} is {json.dumps(value)[:40]}, not {JSON_TYPES[kind]}"
                                  f"{' (non-empty)' if kind is str else ''}")
        header[key] = value
    for key in ("base_fingerprint", "erased_fingerprint"):
        if not FINGERPRINT.fullmatch(header[key]):
            raise _corrupt_header(path, f"{key} {header[key][:40]!r} is not sha256:<64 hex digits>")
    for name, shape in header["shapes"].items():
        if not isinstance(shape, list) or not all(type(n) is int and n > 0 for n in shape):
            raise _corrupt_header(path, f"the shape of {name} is {json.dumps(shape)[:40]}, not a list of positive "
                                  "whole numbers")
    concepts_from_record(header["concepts"], f"the header of {path}")
    return header


def _corrupt_header(path: Path, problem: str) -> EraseError:
    return EraseError(f"{path} has a corrupt header ({problem}): it is damaged or not written by erase; "
                      "export the patch again")


def read_json(text: str, what: str):
    """Parsed JSON, or one line: `what` (the file or field) is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EraseError(f"{what} is not valid JSON ({exc}): export the run again") from None


def check_patch_of_run(folder: Path, record: dict, header: dict) -> None:
    """Refuse a run folder whose patch another run wrote (it would be evaluated as this run's erasure)."""
    differ = [key for key in RUN_FIELDS if header[key] != record[key]]
    if differ:
        raise EraseError(f"{folder / PATCH_NAME} is not this run's patch: it says {_shown(header, differ)}, "
                         f"{RECORD_NAME} says {_shown(record, differ)}: put back the patch the run wrote, or pass the "
                         "folder of the run the patch comes from")


def _shown(fields: dict, keys: list[str]) -> str:
    """Fields of a run, short: concepts by name, fingerprints by their first 12 hex digits."""
    def short(key: str, value) -> str:
        if key == "concepts":
            return ",".join(c["name"] for c in value)
        return f"{value[:19]}…" if key.endswith("fingerprint") else value

    return ", ".join(f"{key} {short(key, fields[key])}" for key in keys)


def check_patch_base(pipe, patch: str | Path, edit: MaskEdit, header: dict) -> str:
    """The denoiser's fingerprint, after refusing a denoiser other than the one the patch was made from, or one whose
    weights the patch's masks and values do not fit (names, shapes, dtype): before any weight is changed."""
    from .families import denoiser_of

    denoiser = denoiser_of(pipe)
    base = fingerprint(denoiser)
    if base != header["base_fingerprint"]:
        raise EraseError(f"patch {patch} was made for base {header['base_fingerprint']}, but this model is {base}: "
                         "apply it to the model it was made from (same weights and dtype)")
    edit.check_fits(denoiser)
    return base


def apply_patch(pipe, patch: str | Path) -> MaskEdit:
    """Apply a saved patch to the pipeline's denoiser in place, refusing a denoiser other than the patch's base."""
    from .families import denoiser_of

    edit, header = read_patch(patch)
    check_patch_base(pipe, patch, edit, header)
    edit.apply(denoiser_of(pipe))
    return edit
