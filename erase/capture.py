"""Activation capture: statistics of the inputs of target Linears over the first T denoiser calls.

The denoising stops after T calls: the statistics need no more, and a full generation would spend most of its time on
steps that are thrown away. A UNet runs in our own loop; a transformer runs in its pipeline's own loop (its latent
packing, sigma shift and guidance are the pipeline's), stopped right after its T-th call. Every prompt starts from the
same initial noise, both CFG halves are captured where the model uses CFG, and statistics stream over prompts (mean
and M2 in fp32), so memory does not grow with the number of prompts.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import check_positive_int
from .errors import EraseError
from .families import Target, family_of
from .models import image_side


@dataclass
class CaptureSettings:
    """How prompts are run through the UNet to collect statistics (shared by the masking methods)."""

    steps: int = 50
    """Scheduler steps of the (never completed) generation; the captured timesteps are its first ones."""
    saliency_steps: int = 10
    """T: UNet calls captured per prompt; the loop stops after them."""
    guidance_scale: float | None = None
    """Guidance of the denoising loop: classifier-free guidance (both halves of the CFG batch are captured), or a
    guidance-distilled model's guidance embedding. None: the model family's default (Stable Diffusion 7.5, SD3 7,
    Flux.1 dev 3.5)."""
    batch_size: int = 8
    """Prompts per denoiser batch (with CFG, each prompt gives a conditional and an unconditional row)."""
    resolution: int | None = None
    """Image side in pixels; None uses the model's default."""
    seed: int = 1244
    """Seed of the initial noise, one latent shared by every prompt (the prompts are not sampled: each concept's
    first ones). The masking methods seed their noise fill of the masked weights with it too (see `fill`)."""
    statistics_threads: int | None = 1
    """CPU threads for the statistics and the masks, memory-bound work (the UNet keeps torch's thread count); None:
    torch's count. One thread is slower on an idle machine and faster on a busy one, where every op of several
    threads waits for a descheduled one (BENCHMARKS.md, "FIA statistics: threads"); on an idle many-core CPU, None."""

    def validate(self) -> None:
        for name in ("steps", "saliency_steps", "batch_size"):
            check_positive_int(name, getattr(self, name))
        if self.saliency_steps > self.steps:
            raise EraseError(f"saliency_steps={self.saliency_steps} exceeds steps={self.steps}: lower saliency_steps")
        if self.resolution is not None:
            check_positive_int("resolution", self.resolution)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise EraseError(f"seed={self.seed!r} must be a whole number")
        if self.statistics_threads is not None:
            check_positive_int("statistics_threads", self.statistics_threads)


class ColumnStats:
    """Streaming mean/std over prompts of one statistic per (layer, captured step).

    Batches merge with Chan's parallel update of (mean, M2): stable where E[v²] − E[v]² would cancel.
    `count` is the number of prompts merged so far; capture() advances it after each batch.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: dict[str, torch.Tensor] = {}
        self._m2: dict[str, torch.Tensor] = {}

    def add(self, name: str, step: int, steps: int, values: torch.Tensor) -> None:
        """values: [prompts of this batch, ...] for one layer at one step."""
        if name not in self._mean:
            shape = (steps, *values.shape[1:])
            self._mean[name] = torch.zeros(shape, dtype=torch.float32, device=values.device)
            self._m2[name] = torch.zeros(shape, dtype=torch.float32, device=values.device)
        n_a, n_b = self.count, values.shape[0]
        batch_mean = values.mean(0)
        delta = batch_mean - self._mean[name][step]
        self._mean[name][step] += delta * (n_b / (n_a + n_b))
        self._m2[name][step] += (values - batch_mean).square().sum(0) + delta.square() * (n_a * n_b / (n_a + n_b))

    def mean(self, name: str) -> torch.Tensor:
        return self._mean[name]

    def std(self, name: str) -> torch.Tensor:
        """Population standard deviation over prompts."""
        return (self._m2[name] / self.count).sqrt()

    def rms(self, name: str) -> torch.Tensor:
        """The statistic pooled over prompts: sqrt(mean of squares)."""
        return (self._mean[name].square() + self._m2[name] / self.count).sqrt()


@contextmanager
def cpu_threads(device: torch.device, threads: int | None):
    """On the CPU, torch's intra-op thread count inside the block (restored after); None or another device: as it is.

    FIA's statistics and masks are memory-bound element-wise work and selections: on a busy machine each op on
    several threads waits at OpenMP's barrier for a descheduled one, while the UNet's long matrix products average
    that out (CaptureSettings.statistics_threads).
    """
    if device.type != "cpu" or threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def column_norms(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Per prompt, the column norms of the row-normalised input: v_j = ||X̃_{:,j}|| over its tokens and CFG halves.

    x: [halves·batch, tokens, C_in] (with CFG two halves, unconditional rows first, as in the CFG batch) → [batch,
    C_in] in fp32.
    """
    x = x.float().flatten(1, -2) if x.dim() > 2 else x.float()[:, None]
    squared = (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).square_().sum(1)  # in place: one copy of x, not two
    return squared.view(-1, batch, squared.shape[-1]).sum(0).sqrt()


def cosine_scores(x: torch.Tensor, weight: torch.Tensor, batch: int) -> torch.Tensor:
    """Per prompt, U_ij = |W_ij| · ||X̃_j|| · |cos(X̃_j, Y_i)| with Y = X̃ Wᵀ (the paper's Eq. 1) → [batch, C_out, C_in]."""
    x = x.float().flatten(1, -2) if x.dim() > 2 else x.float()[:, None]
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    x = torch.cat(x.split(batch), dim=1)  # a prompt's rows: both CFG halves where there are two
    w = weight.float()
    y = x @ w.T
    inner = torch.einsum("bnj,bni->bij", x, y).abs()
    return w.abs() * inner / y.norm(dim=1).clamp_min(1e-12)[:, :, None]


class Recorder:
    """Forward pre-hooks on the target layers that feed one ColumnStats at the current step."""

    def __init__(self, layers: dict[str, Target], steps: int, faithful_cosine: bool = False,
                 threads: int | None = None) -> None:
        self.layers, self.steps, self.faithful_cosine, self.threads = layers, steps, faithful_cosine, threads
        self.stats: ColumnStats | None = None
        self.step = 0
        self.batch = 0
        self._handles = []

    def __enter__(self) -> Recorder:
        for name, target in self.layers.items():
            self._handles.append(target.module.register_forward_pre_hook(self._hook(name, target)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str, target: Target):
        def hook(module: nn.Linear, args):
            x = target.inputs(args[0])
            if self.faithful_cosine:  # matrix products: every thread helps
                self.stats.add(name, self.step, self.steps, cosine_scores(x, target.weight, self.batch))
                return
            with cpu_threads(x.device, self.threads):
                self.stats.add(name, self.step, self.steps, column_norms(x, self.batch))
        return hook


def conditioning(pipe, prompts: list[str], side: int) -> dict:
    """UNet keyword arguments of the CFG batch [unconditional; conditional], as the pipeline itself builds them:
    SD1/SD2 need the text embeddings; SDXL also its pooled embedding and size/crop time ids."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    encoded = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    if not hasattr(pipe, "text_encoder_2"):
        cond, uncond = encoded
        return {"encoder_hidden_states": torch.cat([uncond, cond]).to(dtype)}
    cond, uncond, pooled, uncond_pooled = encoded
    size = (side, side)
    projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection)
    return {"encoder_hidden_states": torch.cat([uncond, cond]).to(dtype),
            "added_cond_kwargs": {"text_embeds": torch.cat([uncond_pooled, pooled]).to(dtype),
                                  "time_ids": time_ids.to(device).repeat(2 * len(prompts), 1)}}


@dataclass
class Denoised:
    """What a truncated denoising loop leaves: the timesteps it used and its last denoiser call."""

    timesteps: list[float]
    """The timesteps the denoiser was called with (a UNet's integer steps; a flow-matching transformer's sigma,
    scaled as its pipeline passes it)."""
    model_input: torch.Tensor
    """The last call's input: the latents (with CFG [unconditional; conditional]), as the denoiser takes them."""
    kwargs: dict
    """The last call's other keyword arguments (conditioning; for a transformer, all but hidden_states and
    timestep)."""
    uncond: torch.Tensor | None
    """The last call's unconditional prediction; None for a model run without CFG."""
    cond: torch.Tensor


def first_calls(pipe, prompts: list[str], settings: CaptureSettings, on_call=None) -> Denoised:
    """Denoise `prompts` from one shared initial noise and stop after T denoiser calls (the family's loop)."""
    if family_of(pipe).own_loop:
        return denoise_first_calls(pipe, prompts, settings, on_call)
    return pipeline_first_calls(pipe, prompts, settings, on_call)


@torch.no_grad()
def denoise_first_calls(pipe, prompts: list[str], settings: CaptureSettings, on_call=None,
                        kwargs: dict | None = None) -> Denoised:
    """Run the CFG denoising loop for `prompts` from one shared initial noise, stopping after T UNet calls.

    on_call(i) runs before UNet call i. kwargs: the prompts' conditioning() when the caller has it already.
    """
    unet = pipe.unet
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # fresh state; the user's stays untouched
    scheduler.set_timesteps(settings.steps, device=unet.device)
    timesteps = scheduler.timesteps[: settings.saliency_steps]
    if len(timesteps) < settings.saliency_steps:
        raise EraseError(f"saliency_steps={settings.saliency_steps} exceeds the {len(scheduler.timesteps)} UNet calls "
                         f"of a {settings.steps}-step generation: lower saliency_steps or raise steps")
    guidance = family_of(pipe).guidance_or_default(pipe, settings.guidance_scale)
    noise = initial_noise(pipe, settings)
    kwargs = kwargs or conditioning(pipe, prompts, noise.shape[-1] * pipe.vae_scale_factor)
    latents = noise.expand(len(prompts), -1, -1, -1) * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        if on_call is not None:
            on_call(i)
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond = unet(x, t, **kwargs).sample.chunk(2)
        if i + 1 < len(timesteps):  # the last call's step would only feed statistics we no longer take
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return Denoised([int(t) for t in timesteps], x, kwargs, uncond, cond)


def initial_noise(pipe, settings: CaptureSettings) -> torch.Tensor:
    """One latent of noise from the seed, drawn on the CPU so that it is the same on every device."""
    unet = pipe.unet
    side = image_side(pipe, settings.resolution) // pipe.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    noise = torch.randn((1, unet.config.in_channels, side, side), generator=generator)
    return noise.to(unet.device, unet.dtype)


class _Enough(Exception):
    """Raised from the transformer's hook once the calls the statistics need are made: the pipeline stops there."""


@torch.no_grad()
def pipeline_first_calls(pipe, prompts: list[str], settings: CaptureSettings, on_call=None) -> Denoised:
    """Run the transformer's own pipeline for `prompts`, every prompt from the same initial noise (one generator per
    prompt, all seeded alike), and stop it right after T transformer calls; on_call(i) runs before call i."""
    family = family_of(pipe)
    transformer = family.denoiser(pipe)
    side = image_side(pipe, settings.resolution)
    calls: list[float] = []
    last: dict = {}

    def before(module, args, kwargs):
        if on_call is not None:
            on_call(len(calls))
        timestep = kwargs["timestep"]
        calls.append(float(timestep.flatten()[0] if torch.is_tensor(timestep) else timestep))  # exact: ESD reuses it
        last.update(args=args, kwargs=kwargs)

    def after(module, args, kwargs, output):
        if len(calls) == settings.saliency_steps:
            last["output"] = output[0] if isinstance(output, tuple) else output.sample
            raise _Enough

    generators = [torch.Generator("cpu").manual_seed(settings.seed) for _ in prompts]
    handles = [transformer.register_forward_pre_hook(before, with_kwargs=True),
               transformer.register_forward_hook(after, with_kwargs=True)]
    try:
        pipe(prompts, num_inference_steps=settings.steps, height=side, width=side, generator=generators,
             guidance_scale=family.guidance_or_default(pipe, settings.guidance_scale), output_type="latent",
             **family.call_kwargs(pipe))
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(calls) < settings.saliency_steps:
        raise EraseError(f"saliency_steps={settings.saliency_steps} exceeds the {len(calls)} transformer calls of a "
                         f"{settings.steps}-step generation: lower saliency_steps or raise steps")
    kwargs = dict(last["kwargs"])
    model_input = last["args"][0] if last["args"] else kwargs.pop("hidden_states")
    kwargs.pop("timestep")
    output = last["output"]
    halves = output.shape[0] // len(prompts)
    uncond, cond = output.chunk(2) if halves == 2 else (None, output)
    return Denoised(calls, model_input, kwargs, uncond, cond)


def capture(pipe, prompts: list[str], layers: dict[str, Target], settings: CaptureSettings,
            faithful_cosine: bool = False, desc: str = "capture", progress: bool = True) -> tuple[ColumnStats, list]:
    """Statistics of the target layers' inputs over `prompts`, batched; returns (stats, timesteps used)."""
    stats = ColumnStats()
    timesteps: list = []
    with Recorder(layers, settings.saliency_steps, faithful_cosine, settings.statistics_threads) as recorder, \
            tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
        recorder.stats = stats
        for start in range(0, len(prompts), settings.batch_size):
            batch = prompts[start : start + settings.batch_size]
            recorder.batch = len(batch)
            timesteps = first_calls(pipe, batch, settings, on_call=lambda i: setattr(recorder, "step", i)).timesteps
            stats.count += len(batch)
            bar.update(len(batch))
    return stats, timesteps
