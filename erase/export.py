"""Writing results: the erased UNet in diffusers format, the patch, and erase.json — atomically.

Everything is written into a hidden sibling folder and renamed into place at the end, so an interrupted run
leaves either the previous folder or the complete new one, never a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .edits import PATCH_FORMAT, MaskEdit, fingerprint
from .errors import EraseError

PATCH_NAME = "patch.safetensors"
RECORD_NAME = "erase.json"


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work is done, an output that cannot be written or would clobber a previous run."""
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        raise EraseError(f"the folder {out.parent} does not exist: create it first or choose another --out")
    if out.exists() and not out.is_dir():
        raise EraseError(f"--out {out} is a file: choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise EraseError(f"--out {out} exists and is not empty: choose another folder or pass --overwrite")
    return out


@contextmanager
def atomic_dir(out: Path):
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def save_patch(path: Path, edit: MaskEdit, metadata: dict) -> None:
    """The edit alone: packed masks plus metadata (format, shapes, fingerprints, method, concepts)."""
    tensors, shapes = edit.to_tensors()
    header = {"format": PATCH_FORMAT, "shapes": json.dumps(shapes)}
    header.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()})
    save_file(tensors, str(path), metadata=header)


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
    try:
        shapes = json.loads(metadata["shapes"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise EraseError(f"{path} has a corrupt header (no readable shapes): export the patch again") from exc
    return MaskEdit.from_tensors(tensors, shapes), metadata


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
