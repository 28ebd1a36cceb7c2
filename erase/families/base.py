"""What a model family's adapter names, and the registry that finds a pipeline's family.

Methods, edits, fingerprints, exports and evaluation talk to "the denoiser" (a UNet or a transformer) through one
adapter per family: which Linear inputs FIA and ConceptPrune score, which text-side projections UCE edits, which
parameters the training methods train, how the pipeline conditions and steps the denoiser, and which single-file
layout the community loads. A new family is one file that registers its adapter.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import EraseError


@dataclass(frozen=True)
class Target:
    """A Linear whose input columns the masking methods score: all of them, or a slice of them (Flux's single
    blocks: `proj_out` reads the attention's output and the MLP's hidden units side by side; only the latter are
    the feed-forward neurons)."""

    module: nn.Linear
    columns: slice | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The scored part of the weight: [out, scored columns]."""
        return self.module.weight if self.columns is None else self.module.weight[:, self.columns]

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.columns is None else x[..., self.columns]

    def full_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask of the scored part as a mask of the whole weight (False outside the scored columns)."""
        if self.columns is None:
            return mask
        full = torch.zeros(self.module.weight.shape, dtype=torch.bool, device=mask.device)
        full[:, self.columns] = mask
        return full


def linears(denoiser: nn.Module, pattern: str) -> dict[str, nn.Linear]:
    """The Linear modules whose name matches the glob `pattern`, in module order."""
    layers = {name: m for name, m in denoiser.named_modules()
              if isinstance(m, nn.Linear) and fnmatch.fnmatch(name, pattern)}
    if not layers:
        raise EraseError(f"no Linear layer of the {type(denoiser).__name__} matches target {pattern!r}: use a glob "
                         "over module names such as '*ff.net.2', or leave it unset for the model family's own")
    return layers


def find_target_layers(denoiser: nn.Module, pattern: str) -> dict[str, Target]:
    """The Linear modules whose name matches the glob `pattern`, whole, in module order."""
    return {name: Target(m) for name, m in linears(denoiser, pattern).items()}


class Family:
    """One model family's adapter. Subclasses set the class attributes and override what differs."""

    name: str = ""
    """Registry name (also recorded in erase.json)."""
    title: str = ""
    """How users know the family: "Stable Diffusion 3 / 3.5 (MMDiT)"."""
    attribute: str = "transformer"
    """The pipeline's attribute holding the denoiser, also the name of its diffusers subfolder."""
    own_loop: bool = False
    """Whether erase's own CFG loop runs the denoiser for the capture (a UNet: its statistics as recorded); else the
    pipeline's own loop does, stopped after the calls the capture needs."""
    ffn_pattern: str = "*ff.net.2"
    """Glob over the denoiser's module names: the feed-forward down-projections (what `target: ffn` means)."""
    text_pattern: str | None = None
    """Glob over the Linear layers that read the text encoder's output (UCE's edit); None: UCE does not apply."""
    attention: str = r"\.attn2\."
    """Regex over parameter names: the attention where the text meets the image (ESD-x, SalUn's attn2, dynamic
    masks)."""
    flow_matching: bool = False
    """Trained with the flow-matching (velocity) objective rather than DDPM noise prediction."""
    single_file: str | None = None
    """The community's single-file layout, where there is one."""
    single_file_holds: str = "pipeline"
    """What the single file holds: the whole 'pipeline' (denoiser, VAE, text encoders) or the 'denoiser' alone."""
    layout: str | None = None
    """The module that writes it: its unsupported(pipe) says why a pipeline cannot be written, its
    save_single_file(pipe, path, metadata, half) writes it."""
    trains: bool = True
    """Whether the training methods (ESD, SalUn, dynamic masks) and their LoRA apply."""

    # -- which pipelines ---------------------------------------------------------------------------------------
    def matches(self, pipe) -> bool:
        raise NotImplementedError

    def denoiser(self, pipe) -> nn.Module:
        return getattr(pipe, self.attribute)

    def guidance(self, pipe) -> str:
        """'cfg': classifier-free guidance, both halves in one batch; 'distilled': a guidance embedding, one pass a
        step (Flux.1 dev); 'none' (Flux.1 schnell)."""
        return "cfg"

    def guidance_scale(self, pipe) -> float:
        """The guidance its images are drawn at by default: the pipeline's own default."""
        default = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
        return float(default.default) if default is not None and default.default is not inspect.Parameter.empty else 7.5

    def guidance_or_default(self, pipe, value: float | None) -> float:
        """`value`, or where a setting leaves it unset (None), the family's default guidance."""
        return self.guidance_scale(pipe) if value is None else value

    # -- what the methods edit ---------------------------------------------------------------------------------
    def ffn_targets(self, denoiser: nn.Module) -> dict[str, Target]:
        """The feed-forward down-projections, by module name."""
        return find_target_layers(denoiser, self.ffn_pattern)

    def targets(self, denoiser: nn.Module, target: str) -> dict[str, Target]:
        """`target` 'ffn': the family's feed-forward down-projections; else a glob over Linear module names."""
        if target == "ffn":
            return self.ffn_targets(denoiser)
        return find_target_layers(denoiser, target)

    def text_projections(self, denoiser: nn.Module, target: str) -> dict[str, nn.Linear]:
        """UCE's layers: `target` 'text' names the family's own; else a glob."""
        if target != "text":
            return linears(denoiser, target)
        if self.text_pattern is None:
            raise EraseError(f"UCE has no default layers for {self.title}: pass target=GLOB naming the Linear layers of "
                             f"its {type(denoiser).__name__} that read the text embeddings, or use fia or conceptprune")
        return linears(denoiser, self.text_pattern)

    def text_tokenizer(self, pipe):
        """The tokenizer of the embeddings the text projections read (UCE picks each text's last word token)."""
        return pipe.tokenizer

    def text_embeddings(self, pipe, texts: list[str]) -> torch.Tensor:
        """[len(texts), tokens, d]: the text sequence the denoiser reads, as the pipeline encodes it."""
        return pipe.encode_prompt(prompt=texts, device=self.denoiser(pipe).device, num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0]

    def trainable(self, denoiser: nn.Module, train: str) -> dict[str, nn.Parameter]:
        """The parameters a training method trains: 'attention' (where the text meets the image; ESD-x) or 'rest'
        (every other Linear/Conv weight and bias; ESD-u)."""
        attention = re.compile(self.attention)
        if train == "attention":
            return {n: p for n, p in denoiser.named_parameters() if attention.search(n)}
        layers = (n for n, m in denoiser.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d)) and not attention.search(n + "."))
        names = {f"{n}.{kind}" for n in layers for kind in ("weight", "bias")}
        return {n: p for n, p in denoiser.named_parameters() if n in names}

    def check_method(self, method) -> None:
        """Refuse, before any work, a method this family has no parts for (a registry entry of erase.methods)."""
        from ..training import TrainingSettings

        if not self.trains and issubclass(method.config_class, TrainingSettings):
            raise EraseError(f"the training methods (esd, salun, dynamic) do not support {self.title} yet: use fia "
                             "or conceptprune")

    # -- what it exports ----------------------------------------------------------------------------------------
    def single_file_problem(self, pipe) -> str | None:
        """Why this pipeline gets no single file, or None when it gets one."""
        if self.layout is None:
            return (f"{self.title} has no single-file layout that other tools load: use the diffusers "
                    f"{self.attribute}/ folder or the patch")
        return importlib.import_module(self.layout).unsupported(pipe)

    def save_single_file(self, pipe, path, metadata: dict, half: bool = False) -> None:
        importlib.import_module(self.layout).save_single_file(pipe, path, metadata, half=half)

    # -- how the pipeline runs it ------------------------------------------------------------------------------
    def default_side(self, pipe) -> int:
        raise NotImplementedError

    def side_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor

    def activation_bytes(self, denoiser: nn.Module, latent_side: int) -> int:
        """A lower bound on one activation of the denoiser's first block for one image (memory checks)."""
        raise NotImplementedError

    def call_kwargs(self, pipe) -> dict:
        """Extra keyword arguments of the pipeline call that make it draw exactly the asked side."""
        return {}

    # -- training ----------------------------------------------------------------------------------------------
    def conditioning(self, pipe, prompts: list[str], side: int) -> dict:
        """The denoiser's keyword arguments of `prompts` (conditional only), one row per prompt, as the pipeline
        encodes them; what every row shares is added by `predict`. Not under no_grad: an attack differentiates
        through it."""
        raise NotImplementedError

    def forward(self, model: nn.Module, x: torch.Tensor, timestep, kwargs: dict) -> torch.Tensor:
        """The denoiser's output for one call as its pipeline makes it: `timestep` in the denoiser's own scale and
        `kwargs` complete (as a truncated sampling's last call left them, erase.capture.Denoised)."""
        timestep = torch.as_tensor(timestep, device=x.device).expand(len(x))
        return model(hidden_states=x, timestep=timestep, **{**kwargs, "return_dict": False})[0]

    def predict(self, pipe, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The denoiser's output at `noised`'s (x_t, t) for rows of `conditioning()`."""
        return self.forward(model, x_t, t, conditioning)

    def noise_schedule(self, pipe, side: int):
        """What `noised` draws from, for images of `side` pixels. DDPM: the pipeline's betas. Flow matching: σ on a
        uniform grid of (0, 1] through the pipeline scheduler's own shift (Flux.1 dev's depends on the image's
        token count, as in its pipeline)."""
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        if not self.flow_matching:
            return DDPMScheduler.from_config(pipe.scheduler.config)
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        schedule = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        c = schedule.config
        mu = calculate_shift((side // self.side_multiple(pipe)) ** 2, c.base_image_seq_len, c.max_image_seq_len,
                             c.base_shift, c.max_shift) if c.use_dynamic_shifting else None
        steps = c.num_train_timesteps
        schedule.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], mu=mu)
        return schedule

    def noised(self, schedule, latents: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, target): a random timestep per latent, fresh noise, and what the denoiser should output. DDPM:
        t ~ U{0..T-1}, target ε (v for v-models). Flow matching: x_t = (1 − σ) x0 + σ ε with σ drawn from the
        schedule's grid, target the velocity ε − x0, t = 1000 σ (the pipeline scheduler's timestep)."""
        if not self.flow_matching:
            t = torch.randint(schedule.config.num_train_timesteps, (len(latents),), generator=generator)
            noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
            t = t.to(latents.device)
            x_t = schedule.add_noise(latents, noise, t)
            if schedule.config.prediction_type == "v_prediction":
                return x_t, t, schedule.get_velocity(latents, noise, t)
            return x_t, t, noise
        index = torch.randint(len(schedule.timesteps), (len(latents),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        sigma = schedule.sigmas[index].to(latents.device, latents.dtype).view(-1, *[1] * (latents.dim() - 1))
        return (1 - sigma) * latents + sigma * noise, schedule.timesteps[index].to(latents.device), noise - latents

    def latents_shape(self, pipe, side: int) -> list[int]:
        """One image's latents as the pipeline returns them with output_type='latent' (what the training methods
        train on)."""
        latent_side = side // pipe.vae_scale_factor
        return [self.denoiser(pipe).config.in_channels, latent_side, latent_side]


FAMILIES: dict[str, Family] = {}


def register_family(family: type[Family]) -> type[Family]:
    """Register an adapter; pipelines are matched in registration order (the generic transformer family last)."""
    FAMILIES[family.name] = family()
    return family


def family_of(pipe) -> Family:
    """The family of a loaded pipeline, refused with one line when erase has none for it."""
    for family in FAMILIES.values():
        if family.matches(pipe):
            return family
    raise EraseError(f"{type(pipe).__name__} is not a model erase can edit (a Stable Diffusion UNet, SD3/SD3.5, Flux.1, "
                     "or a diffusers text-to-image transformer built from FeedForward blocks): pass such a pipeline, "
                     "e.g. from erase.load_pipeline")


def denoiser_of(pipe) -> nn.Module:
    """The pipeline's denoiser: its UNet or transformer."""
    return family_of(pipe).denoiser(pipe)
