"""What the model generates for erase, cached under $ERASE_CACHE (default ~/.cache/erase) and checked on read.

The training-based methods need images of the concept (forget set) and of its anchor (remap and retain sets).
As in the published methods they are sampled from the model being erased; what is stored is the final latents
(the UNet trains on latents, so no VAE round trip), one file per prompt and sampling setting under
$ERASE_CACHE/latents. The evaluator keeps the original model's images under $ERASE_CACHE/images, one file per batch.
A second run on the same weights, or a resumed one, reads them back.

Each file records what it stands for: the fingerprints of every module that took part (the UNet as it was when the
batch was generated), the sampler and its settings, the prompts, seeds, count, shape and dtype, and a checksum of its
data. A file that does not hold exactly the batch asked for (swapped, replaced, damaged, truncated) is generated
again with a note, never used. Writes are atomic. A cache folder that cannot be used is refused before any work
(check_cache); a write that fails mid-run (disk full) is noted once and skipped: the cache saves time, it never
decides a number, so the run goes on without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .edits import fingerprint
from .errors import EraseError
from .export import disk_full, process_alive
from .families import denoiser_of, family_of
from .models import image_side

TENSOR = "data"
TEMP = re.compile(r".+\.tmp(\d+)")  # a file being written by the process of that id
_unwritable: set[Path] = set()
"""Cache folders a write failed in during this process (noted once)."""


@dataclass(frozen=True)
class SampleSettings:
    """How the training images are sampled (every prompt from the same seed)."""

    count: int
    steps: int
    guidance_scale: float
    resolution: int | None
    seed: int


def cache_dir() -> Path:
    return Path(os.environ.get("ERASE_CACHE") or Path.home() / ".cache" / "erase")


def check_cache(without: str = "") -> None:
    """Refuse, in one line and before any work, a cache folder that cannot be created or written. without: how to
    run without the cache, added to the fix."""
    folder = cache_dir()
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))
    if not existing.is_dir():
        why = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = "is not writable" if existing == folder else f"cannot be created: {existing} is not writable"
    else:
        return
    which = "ERASE_CACHE" if os.environ.get("ERASE_CACHE") else "the default: ERASE_CACHE is unset"
    raise EraseError(f"the cache folder {folder} ({which}) {why}: set ERASE_CACHE to a writable folder{without}")


def model_identity(pipe, denoiser_fingerprint: str | None = None, images: bool = False) -> dict:
    """What a model's samples depend on: the fingerprints of its denoiser as it is now (pass it when the caller has
    hashed it) and of every other module that takes part (the text encoder(s); for decoded images also the VAE and
    any safety checker), and the sampler with its settings."""
    family = family_of(pipe)
    modules = {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
               and name != family.attribute and (images or name.startswith("text_encoder"))}
    return {family.attribute: denoiser_fingerprint or fingerprint(family.denoiser(pipe)),
            **{name: fingerprint(module) for name, module in sorted(modules.items())},
            "sampler": type(pipe.scheduler).__name__,
            # not diffusers' bookkeeping (_use_default_values is a list in no fixed order: another key per process)
            "sampler_config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}}


def digest(meta: dict) -> str:
    return hashlib.sha256(canonical(meta).encode()).hexdigest()[:24]


def canonical(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, default=str)


def checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy()).hexdigest()


class ModelCache:
    """One model's cached batches of one kind ("images" or "latents"), in $ERASE_CACHE/<kind>/<key>/."""

    def __init__(self, kind: str, pipe, denoiser_fingerprint: str | None = None) -> None:
        self.model = model_identity(pipe, denoiser_fingerprint, images=kind == "images")
        self.key = digest(self.model)
        self.folder = cache_dir() / kind / self.key
        self.cleaned = False  # dead writers' leftovers removed: once per cache, not a folder listing per batch

    def get(self, batch: dict, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The batch from its file when the file holds exactly it, else make()'s, stored there for next time.
        batch: what the tensor depends on besides the model, with its "shape" (a list) and "dtype" (torch's name)."""
        path = self.folder / f"{digest(batch)}.safetensors"
        identity = canonical({**self.model, **batch})
        tensor = _read(path, identity, batch)
        if tensor is None:
            tensor = make()
            _write(path, tensor, identity, clean=not self.cleaned)
            self.cleaned = True
        return tensor


def _read(path: Path, identity: str, batch: dict) -> torch.Tensor | None:
    """The file's tensor if it holds the batch `identity` describes, unchanged; None (with a note if there was a
    file) otherwise."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            record, tensor = f.metadata() or {}, f.get_tensor(TENSOR).clone()  # not a view of a file others may write
    except (SafetensorError, OSError) as exc:
        problem = f"cannot be read ({' '.join(str(exc).split())})"
    else:
        problem = ("records nothing of what it holds" if "identity" not in record
                   else "holds another batch than asked for" if record["identity"] != identity
                   else "holds data of another shape" if [*tensor.shape] != batch["shape"]
                   or str(tensor.dtype) != batch["dtype"]
                   else "was changed since it was written" if record.get("sha256") != checksum(tensor)
                   else None)
    if problem is None:
        return tensor
    print(f"erase: note: cache file {path} {problem}: generating it again", file=sys.stderr)
    return None


def _write(path: Path, tensor: torch.Tensor, identity: str, clean: bool) -> None:
    """Store atomically (a killed writer leaves only its .tmp<pid>, removed by the next writer: clean); a write that fails
    (disk full, folder gone read-only) leaves nothing and is noted once per folder: the run goes on uncached."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if clean:
            _clean_after_dead_writers(path.parent)
        save_file({TENSOR: tensor.contiguous()}, str(tmp), metadata={"identity": identity, "sha256": checksum(tensor)})
        os.replace(tmp, path)  # a crash never leaves a half-written file under the cache name
    except (OSError, SafetensorError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if path.parent not in _unwritable:
            _unwritable.add(path.parent)
            reason = ("No space left on device" if disk_full(exc)
                      else getattr(exc, "strerror", None) or " ".join(str(exc).split()))
            print(f"erase: note: cannot write the cache in {path.parent} ({reason}): going on without caching",
                  file=sys.stderr)


def _clean_after_dead_writers(folder: Path) -> None:
    for leftover in folder.iterdir():
        match = TEMP.fullmatch(leftover.name)
        if match and not process_alive(int(match[1])):
            leftover.unlink(missing_ok=True)


def sample_latents(pipe, prompts: list[tuple[str, str | None]], settings: SampleSettings, cache: ModelCache,
                   progress: bool = True) -> list[torch.Tensor]:
    """Latents of each (prompt, negative prompt) as the pipeline returns them with output_type="latent" ([count, C,
    h, w]; Flux.1: packed, [count, tokens, C]), from `cache` (the pipeline's as it is now) or sampled and cached."""
    side = image_side(pipe, settings.resolution)
    denoiser = denoiser_of(pipe)
    shape = [settings.count, *family_of(pipe).latents_shape(pipe, side)]
    out = []
    for prompt, negative in tqdm(prompts, desc="training data", unit="prompt", disable=not progress, leave=False):
        batch = {"prompt": prompt, "negative_prompt": negative or "", "side": side, **asdict(settings),
                 "device": denoiser.device.type, "shape": shape, "dtype": str(torch.float32)}
        latents = cache.get(batch, partial(_sample, pipe, prompt, negative, settings, side))
        out.append(latents.to(denoiser.device, denoiser.dtype))  # fresh or cached: the same float32 values
    return out


def _sample(pipe, prompt: str, negative: str | None, settings: SampleSettings, side: int) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    return pipe(prompt, negative_prompt=negative, num_images_per_prompt=settings.count, height=side, width=side,
                num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale, generator=generator,
                output_type="latent", **family_of(pipe).call_kwargs(pipe)).images.detach().float().cpu().contiguous()
