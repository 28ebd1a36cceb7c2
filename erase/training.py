"""Shared parts of the training-based methods (docs/methods.md): settings, data, strict masking, the loop,
checkpoints.

Strict masking: a weight outside the trainable mask must not move at all. Masking the gradient is not enough —
Adam's momentum from earlier steps and decoupled weight decay still move it (the reference dynamic-mask code
has exactly this leak) — so the frozen entries are written back after every optimiser step.

Reproducibility: every random draw of step s comes from a generator seeded with (seed, s) and the data is
cached, so a run resumed from a checkpoint takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import check_choice, check_positive, check_positive_int
from .data import ModelCache, SampleSettings, check_cache, sample_latents
from .edits import MaskEdit
from .errors import EraseError, TrainingStopped
from .families import family_of
from .models import image_side

PRECISIONS = ("no", "bf16", "fp16")
RUN_CONTROL = ("checkpoint_dir", "checkpoint_every", "stop_after")  # how a run is split, not what it computes
TRAINER_FIELDS = {"step": int, "losses": list, "state": dict, "params": dict, "loop_s": (float, type(None))}
"""What a training method's checkpoint holds (loop_s is absent from older ones)."""


@dataclass
class TrainingSettings:
    """How a training run steps, and how it can be split, resumed and run in lower precision."""

    steps: int = 200
    """Optimiser steps (per concept for sequential methods)."""
    lr: float = 1e-5
    resolution: int | None = None
    """Image side in pixels; None uses the model's default."""
    seed: int = 0
    """Seeds every step's draws (timesteps, noise, batches; ESD's sampled x_t) and the training images that SalUn and
    dynamic masks sample from the model; a resumed run draws what an uninterrupted one draws."""
    mixed_precision: str = "no"
    """'no', 'bf16' or 'fp16': autocast through accelerate (fp16 is for GPUs); the weights stay in their dtype."""
    checkpoint_dir: str | None = None
    """Where to keep a checkpoint of the run; an existing one for the same run is resumed. None: no checkpoints."""
    checkpoint_every: int = 50
    stop_after: int | None = None
    """Stop after this many steps, leaving a checkpoint (split a long run over time-limited jobs)."""

    def validate(self) -> None:
        for name in ("steps", "checkpoint_every"):
            check_positive_int(name, getattr(self, name))
        check_positive("lr", self.lr, "1e-5")
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        if self.stop_after is not None:
            check_positive_int("stop_after", self.stop_after)
            if self.checkpoint_dir is None:
                raise EraseError("stop_after needs a checkpoint_dir to resume from: set checkpoint_dir=PATH")


@dataclass
class DataSettings(TrainingSettings):
    """Training on images the model samples itself (SalUn, dynamic masks)."""

    batch_size: int = 4
    prompts_per_concept: int = 4
    """Concept prompts (and their anchors) the training images are sampled from."""
    images_per_prompt: int = 4
    sample_steps: int = 25
    """Sampling steps of the training images (cached on disk by model fingerprint and prompt)."""
    sample_guidance: float | None = None
    """Guidance of that sampling; None: the model family's (Stable Diffusion 7.5, SD3 7, Flux.1 dev 3.5)."""

    def validate(self) -> None:
        super().validate()
        for name in ("batch_size", "prompts_per_concept", "images_per_prompt", "sample_steps"):
            check_positive_int(name, getattr(self, name))
        check_cache()  # the training images are cached: a folder that cannot be is refused before any work


class MaskedOptimizer:
    """Wrap any torch optimiser so that, per parameter, only the entries where `masks` is True ever change.

    masks: parameter → bool tensor of its shape (True = trainable). set_masks() changes them (dynamic masks);
    the entries it freezes keep the values they have at that moment.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, masks: dict[nn.Parameter, torch.Tensor]) -> None:
        self.optimizer = optimizer
        self.set_masks(masks)

    @torch.no_grad()
    def set_masks(self, masks: dict[nn.Parameter, torch.Tensor]) -> None:
        self.masks = {p: m.to(p.device, torch.bool) for p, m in masks.items()}
        self._frozen = {p: p[~m].clone() for p, m in self.masks.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in self.masks.items():
            if p.grad is not None:
                p.grad.mul_(m)  # frozen entries add nothing to the optimiser's state
        self.optimizer.step()
        for p, m in self.masks.items():
            p[~m] = self._frozen[p]


@contextmanager
def swapped(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]):
    """The parameters hold `values` inside the block, their own values again after it: a frozen or teacher
    model without a second denoiser in memory."""
    with torch.no_grad():
        own = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.copy_(values[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(own[n])


@dataclass
class Examples:
    """Training images of some prompts: latents, the prompt each came from, and the prompts' conditioning."""

    latents: torch.Tensor
    prompt_index: torch.Tensor
    conditioning: dict

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` random images: (latents, the index of the prompt of each)."""
        pick = torch.randint(len(self.latents), (size,), generator=generator)
        return self.latents[pick.to(self.latents.device)], self.prompt_index[pick]

    def cond(self, prompt_index: torch.Tensor) -> dict:
        return rows(self.conditioning, prompt_index)


@dataclass
class ForgetSet:
    """The concepts' images (forget) and their anchors' images; anchor_of maps a forget prompt to its anchor's."""

    forget: Examples
    anchors: Examples
    anchor_of: torch.Tensor

    def anchor_cond(self, forget_index: torch.Tensor) -> dict:
        return self.anchors.cond(self.anchor_of[forget_index])


def rows(kwargs: dict, index: torch.Tensor) -> dict:
    """The denoiser keyword arguments of the given prompts (nested dicts, as SDXL's added_cond_kwargs)."""
    return {k: rows(v, index) if isinstance(v, dict) else v[index.to(v.device)] for k, v in kwargs.items()}


def encode(pipe, prompts: list[str], side: int) -> dict:
    """One row of denoiser keyword arguments per prompt (conditional only): the family's conditioning, without
    gradients."""
    with torch.no_grad():
        return family_of(pipe).conditioning(pipe, prompts, side)


def accelerator(mixed_precision: str, cpu: bool):
    """An Accelerator with this precision. Accelerate keeps one state per process and refuses a second precision;
    a notebook that trains once in fp32 and then in bf16 is a normal use, so the state is reset for it.
    Launched as several processes (torchrun, accelerate launch), the denoiser is trained data-parallel; trained
    parameters that a step does not reach (SalUn's whole-denoiser set) must not stall the gradient all-reduce."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


class Trainer:
    """One training run on a pipeline's denoiser (UNet or transformer): its trainable parameters, data, noise, loop
    and checkpoints. The family's adapter says how to condition, noise and call the denoiser (DDPM or flow matching).

    The denoiser is trained in place and always restored afterwards (also on error or interruption); the result
    is returned as an edit. Only one denoiser is ever in memory: frozen/teacher predictions swap weights in.
    """

    def __init__(self, pipe, params: dict[str, nn.Parameter], settings: TrainingSettings | DataSettings, method: str,
                 concepts: list, progress: bool = True, denoiser_fingerprint: str | None = None) -> None:
        self.family = family_of(pipe)
        self.denoiser = self.family.denoiser(pipe)
        self.pipe, self.params, self.settings, self.progress = pipe, params, settings, progress
        self.accelerator = accelerator(settings.mixed_precision, cpu=self.denoiser.device.type == "cpu")
        self.model = self.denoiser  # the data-parallel wrapper inside training() when there are several processes
        self.side = image_side(pipe, settings.resolution)
        self.noise_schedule = self.family.noise_schedule(pipe, self.side)
        self.original = {n: p.detach().clone() for n, p in params.items()}
        self.data_cache = ModelCache("latents", pipe, denoiser_fingerprint)  # erase() hashed the denoiser already
        self.key = self.data_cache.key
        run = {k: v for k, v in asdict(settings).items() if k not in RUN_CONTROL}
        self.checkpoint = Checkpoint(settings.checkpoint_dir and Path(settings.checkpoint_dir) / "checkpoint.pt",
                                     {"method": method, "model": self.key, "settings": run,
                                      "concepts": [c.name for c in concepts]}, TRAINER_FIELDS)
        self.saved = self.checkpoint.load()  # refused now, not after a minute of sampling the training data
        self._check_saved_params()
        self.losses: list[dict] = []
        self.resumed_from_step = 0
        self.earlier_attempts_s: float | None = 0.0  # loop time of the attempts a resumed run continues

    # -- data -------------------------------------------------------------------------------------------------
    def examples(self, prompts: list[str], negative: list[str | None] | None = None) -> Examples:
        """Training images of `prompts` sampled by the (unedited) model, cached; with their conditioning."""
        s = self.settings
        guidance = self.family.guidance_or_default(self.pipe, s.sample_guidance)
        sampling = SampleSettings(s.images_per_prompt, s.sample_steps, guidance, s.resolution, s.seed)
        with torch.no_grad(), self.accelerator.main_process_first():  # the others then read the main's cache
            latents = sample_latents(self.pipe, list(zip(prompts, negative or [None] * len(prompts))), sampling,
                                     self.data_cache, self.progress and self.accelerator.is_main_process)
        index = torch.arange(len(prompts)).repeat_interleave(s.images_per_prompt)
        return Examples(torch.cat(latents), index, encode(self.pipe, prompts, self.side))

    def forget_set(self, concepts, catalog, negative_anchors: bool = False) -> ForgetSet:
        """Images of the concepts' prompts and of their anchors (c.anchor, else the pair's base prompt).

        negative_anchors: sample the anchors with the concept as negative prompt (superclass images that
        avoid the concept, as the dynamic-mask method does; a model sampled without CFG, Flux.1, has no negative
        prompt and samples the anchors alone).
        """
        n = self.settings.prompts_per_concept
        pairs = [(p, (c.anchor or b, c.text if negative_anchors else None))
                 for c in concepts for p, b in catalog.prompt_pairs(c, n)]
        anchors = list(dict.fromkeys(a for _, a in pairs))
        anchor_of = torch.tensor([anchors.index(a) for _, a in pairs])
        return ForgetSet(self.examples([p for p, _ in pairs]),
                         self.examples([a for a, _ in anchors], [neg for _, neg in anchors]), anchor_of)

    def retain_examples(self, concepts, catalog) -> Examples:
        """Images of what must survive: the concepts' rivals of their kind (the other classes) and their anchors;
        the base prompts when a concept has neither."""
        erased = {catalog.alternatives(c)[0] for c in concepts}
        prompts = [a for c in concepts for a in catalog.alternatives(c)[1:] or
                   [b for _, b in catalog.prompt_pairs(c, self.settings.prompts_per_concept)] if a not in erased]
        return self.examples(list(dict.fromkeys(prompts)))

    # -- one step's randomness and predictions ----------------------------------------------------------------
    def generator(self, step: int, stream: int = 0) -> torch.Generator:
        """Step `step`'s draws; each process of a data-parallel run draws its own batch."""
        seed = (self.settings.seed * 1_000_003 + step) * 7 + stream
        return torch.Generator("cpu").manual_seed(seed + 104_729 * self.accelerator.process_index)

    def noised(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.family.noised(self.noise_schedule, latents, generator)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The denoiser's output at noised()'s (x_t, t) for rows of an Examples' conditioning."""
        with self.accelerator.autocast():
            return self.family.predict(self.pipe, self.model, x_t, t, cond).float()

    def forward(self, x: torch.Tensor, timestep, kwargs: dict) -> torch.Tensor:
        """The denoiser's output for a call as its pipeline made it (a truncated sampling's, capture.Denoised)."""
        with self.accelerator.autocast():
            return self.family.forward(self.model, x, timestep, kwargs).float()

    def weights(self, values: dict[str, torch.Tensor]):
        """The trained parameters hold `values` inside the block (a frozen or teacher model), their own after it."""
        return swapped(self.params, values)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    # -- the run ----------------------------------------------------------------------------------------------
    @contextmanager
    def training(self):
        """Only the trained parameters require gradients inside the block; after it, the denoiser is as it was."""
        requires_grad = {n: p.requires_grad for n, p in self.denoiser.named_parameters()}
        self.denoiser.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        if self.accelerator.num_processes > 1:  # wraps after requires_grad: DDP syncs exactly the trained set
            self.model = self.accelerator.prepare_model(self.denoiser, device_placement=False)
        try:
            yield
        finally:
            self.model = self.denoiser
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.original[n])
                    p.grad = None
            for n, p in self.denoiser.named_parameters():
                p.requires_grad_(requires_grad[n])

    def loop(self, total: int, step: Callable[[int], dict], state: Callable[[], dict],
             restore: Callable[[dict], None], desc: str) -> None:
        """Run step(s) for s in [0, total), resuming from the checkpoint if there is one.

        step returns the step's losses (floats); state()/restore() save and load what the method keeps between
        steps besides the trained weights (optimiser, masks, accumulators).
        """
        start = 0
        saved, self.saved = self.saved, None  # not held through training
        if saved is not None:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved["params"][n])
            restore(saved["state"])
            self.losses, start = saved["losses"], saved["step"]
            self.resumed_from_step, self.earlier_attempts_s = start, saved.get("loop_s")  # None: an older checkpoint
        s = self.settings
        started = time.perf_counter()
        for i in tqdm(range(start, total), desc=desc, unit="step", initial=start,
                      disable=not (self.progress and self.accelerator.is_main_process),
                      total=total):
            self.losses.append({k: round(torch.as_tensor(v).detach().item(), 6) for k, v in step(i).items()})
            done = i + 1
            stopping = s.stop_after is not None and done >= s.stop_after and done < total
            if done < total and (done % s.checkpoint_every == 0 or stopping):
                if self.accelerator.is_main_process:  # every process holds the same weights after the all-reduce
                    loop_s = None if self.earlier_attempts_s is None else \
                        self.earlier_attempts_s + time.perf_counter() - started
                    self.checkpoint.save({"step": done, "losses": self.losses, "state": state(), "loop_s": loop_s,
                                          "params": {n: p.detach().cpu() for n, p in self.params.items()}})
                self.accelerator.wait_for_everyone()
            if stopping:
                raise TrainingStopped(f"stopped after {done} of {total} steps as asked (stop_after): run the same "
                                      f"command again to resume from {self.checkpoint.path}")

    def _check_saved_params(self) -> None:
        """The checkpoint holds every trained parameter in its shape (one of this run's, not a damaged file)."""
        if self.saved is None:
            return
        params = self.saved["params"]
        for name, param in self.params.items():
            if not isinstance(params.get(name), torch.Tensor) or params[name].shape != param.shape:
                raise self.checkpoint.damaged(f"{name} is missing or not of shape {list(param.shape)}")

    def edit(self) -> MaskEdit:
        """The trained weights as an edit of the original ones (call inside training())."""
        return MaskEdit.from_weights({n: p.detach().clone() for n, p in self.params.items()}, self.original)

    def finish(self) -> dict:
        """Remove the finished run's checkpoint; the record every trained method writes.

        A resumed run's timings cover only its last attempt: earlier_attempts_s is the training loop time of the
        attempts before it (None when resumed from a checkpoint that did not keep it). A guidance-distilled model
        (Flux.1 dev) is trained at its family's guidance, recorded as training_guidance.
        """
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.checkpoint.remove()
        distilled = self.family.guidance(self.pipe) == "distilled"
        return {"training_curve": self.losses, "trained_parameters": len(self.params),
                "resumed_from_step": self.resumed_from_step, "earlier_attempts_s": self.earlier_attempts_s,
                **({"training_guidance": self.family.guidance_scale(self.pipe)} if distilled else {})}


class Checkpoint:
    """One file per run (a training method's, or a stage of the miniature world's training): whatever state the run
    saves (weights, optimiser, losses, step), written atomically.

    It is our own file, loaded with torch.load(weights_only=True) (tensors and plain Python values only), and
    carries the run's identity (for a method: its settings, concepts and model fingerprint): resuming another run
    is refused, and so is a file that is not a mapping with this identity and `fields` (name → the type or types
    its value must have; a field whose types include NoneType may be absent). path None: no checkpoint (load finds
    nothing, save and remove do nothing).
    """

    def __init__(self, path: str | Path | None, identity: dict, fields: dict | None = None) -> None:
        self.path = Path(path) if path else None
        self.identity = {k: str(v) for k, v in identity.items()}
        self.fields = fields or {}

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (a damaged file raises pickle, zip and runtime errors alike)
            raise EraseError(f"checkpoint {self.path} cannot be read ({type(exc).__name__}): delete it to start "
                             "over") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("identity"), dict):
            raise EraseError(f"{self.path} is not a checkpoint of erase (a {type(saved).__name__} without a run's "
                             "identity): use another checkpoint_dir or delete it")
        if saved["identity"] != self.identity:
            changed = sorted(k for k in self.identity if saved["identity"].get(k) != self.identity[k])
            raise EraseError(f"checkpoint {self.path} belongs to another run (different {', '.join(changed)}): "
                             "use another checkpoint_dir or delete it")
        for name, kinds in self.fields.items():
            value = saved.get(name)
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise self.damaged(f"its {name} is a {type(value).__name__}" if name in saved else f"no {name}")
        return saved

    def damaged(self, problem: str) -> EraseError:
        return EraseError(f"checkpoint {self.path} is damaged ({problem}): delete it to start over or use another "
                          "checkpoint_dir")

    def save(self, data: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"identity": self.identity, **data}, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
