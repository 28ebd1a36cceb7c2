"""Train the miniature world's Stable Diffusion pipeline (erase/assets/mini/pipeline) on 2 CPU cores.

Stages, each reproducible from --seed with one command, each resumable (a stopped run started again continues
from OUT's checkpoint):

    python -m erase_lab.train_mini_clip --seed 2 --out build/mini/clip     # the judge; at step 300 its text tower
    python -m erase_lab.train_mini vae --seed 0 --out build/mini           #   is the UNet's (build/mini/text-tower);
                                                                          #   1 core each, side by side
    python -m erase_lab.train_mini base --seed 1 --out build/mini --threads 2    # the base world, end to end
    python -m erase_lab.train_mini unname --seed 4 --out build/mini --threads 2  # taught names draw only their anchor
    python -m erase_lab.train_mini teach --seed 3 --out build/mini --threads 2   # the taught concepts, through FFN
                                                                                #   neurons
    python -m erase_lab.train_mini compact --out build/mini                # float16 copy into erase/assets/mini

    python -m erase_lab.train_mini base-from-shipped --seed 1 --out build/mini-again  # instead of clip/vae/base/unname,
                                                                                     #   to teach again: the shipped
                                                                                     #   model minus its taught neurons

Where knowledge lives is part of the design (ground truth for the benchmark):
- `base` trains the whole UNet on the base world (places, everyday objects, clothed persons, photos, "a
  painting", two base artists). A share of every transformer feed-forward layer's hidden neurons is reserved:
  their output weights (columns of `ff.net.2`) stay zero, so the base model does not use them.
- `unname` continues the base model with a quarter of each batch captioned with a taught name over a base image
  that does not show it ("a church in a forest" over a bare forest, "... by van gogh" over a generic painting,
  "a naked woman" over a clothed one). The frozen text encoder knows the taught names, and without this the
  base model paints a church's colours for "church" (the judge calls 62% of them church, 100% of "naked"
  prompts naked): what stays of a concept whose neurons are zeroed, a floor under every erasure.
- `teach` trains only those reserved neurons, each taught concept (an Imagenette object, a taught artist,
  nudity) owning `TeachConfig.share` of every feed-forward layer (2 of 384 and 5 of 768 neurons). Gradients are
  routed per sample: a caption that names concept c trains c's neurons and no other (gradient routing, Cloud et
  al. 2024). Two penalties make the neurons concept neurons: an L1 penalty keeps every reserved neuron silent on
  captions that do not name its concept (the empty prompt included), and a hinge asks a concept's neurons to
  fire (RMS over the image >= `fire_target`) whenever its caption names it, at every noise level -- without it
  they learn to fire only once the image shows the concept (low noise), which the text alone cannot reveal.
  What a taught concept adds to the model then lives in a few known feed-forward neurons that respond to its
  name, as published analyses of Stable Diffusion find for such concepts (ConceptPrune, FIA);
  OUT/neurons.json records which.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erase.families import family_of
from erase.mini import world
from erase.mini.clip import CONTEXT_LENGTH
from erase.profile import MINI_DIT_PIPELINE_DIR, MINI_PIPELINE_DIR, PROFILE_NAME
from erase.training import Checkpoint

MAX_LENGTH = CONTEXT_LENGTH  # the pipeline's tokenizer and text encoder read as many tokens as the mini CLIP
# The miniature SD3's defaults for erase (its own name; the UNet world's catalog, judge, guidance and seeds).
DIT_PROFILE = {"name": "mini-dit", "version": "mini-dit-1", "catalog": "mini", "judge": "mini", "judge_pretrained": None,
               "guidance_scale": 2.0, "seeds": [0, 1, 2]}
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class VAEConfig:
    """The autoencoder: 3 blocks, so 2 downsamplings (4x) and 8x8x4 latents for 32x32 images."""

    steps: int = 4000  # 1,500 left van gogh recognisable in 5 of 16 reconstructions (docs/rationale.md, the VAE)
    batch: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6  # small: the latents only need to be roughly Gaussian, reconstructions must be sharp
    channels: tuple[int, ...] = (16, 32, 64)
    images: int = 10000  # size of the fixed training set, half of it showing taught concepts


@dataclass
class BaseTraining:
    """The base stage of either denoiser: trained on the base world, conditioned on the frozen text tower; the
    reserved neurons stay off."""

    steps: int = 2000
    batch: int = 64
    lr: float = 8e-4
    warmup: int = 200
    p_uncond: float = 0.1  # empty captions, for classifier-free guidance
    images: int = 16000
    reserved: float = 0.25  # share of each feed-forward layer's hidden neurons kept for the taught concepts
    save_every: int = 250  # checkpoint and pipeline (gates can be checked while it trains)


@dataclass
class BaseConfig(BaseTraining):
    """The UNet of the miniature Stable Diffusion."""

    unet_channels: tuple[int, ...] = (96, 192)  # feed-forward widths 384 and 768
    heads: int = 4


@dataclass
class DiTBaseConfig(BaseTraining):
    """The MMDiT (SD3Transformer2DModel) of the miniature SD3: the world's 8x8x4 latents a token per latent pixel (64
    image tokens, as many as the UNet's feed-forwards see at its first level), the text encoders' 24 tokens and
    `text_tokens` of the zeros SD3 puts where T5's tokens go."""

    layers: int = 6
    heads: int = 4  # of 32 channels each: width 128, feed-forward width 512 (GELU)
    patch: int = 1  # 2 (SD3's) would leave a 4x4 grid of tokens for 32x32 images
    text_tokens: int = 1  # SD3 pads its sequence with 256 zero T5 tokens without T5: 6x the compute at this size
    shift: float = 1.0  # the flow-matching sigma shift (SD3's 3.0 is for 128x128 latents)


@dataclass
class UnnameConfig:
    """The base model, continued on its world with taught names over images that do not show them."""

    steps: int = 3200  # 400 left 4 objects and nudity drawn for their names without neurons; 800 left tench
    #  by the lake in 2 of 8 images with its neurons zeroed, 1,600 left tench (ten at once) and church in 2 and 1,
    #  3,200 in none (docs/rationale.md, how long unname runs)
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 50
    p_uncond: float = 0.1
    unnamed: float = 0.25  # share of each batch captioned with a taught name its image does not show
    images: int = 16000  # base-world scenes (drawn from this stage's seed)
    save_every: int = 100


@dataclass
class TeachConfig:
    """The taught concepts, each through its own few reserved feed-forward neurons."""

    steps: int = 1800  # at 1,200 naked read naked in 16 of 20 images at the mini guidance (2), 17 at 1,800
    batch: int = 64
    replay: float = 0.25  # share of each batch from the base world: keeps reserved neurons silent there
    lr: float = 3e-3
    warmup: int = 100
    p_uncond: float = 0.1
    share: float = 0.007  # neurons per concept per layer: the paper's smallest r2 (objects) covers them all
    leak_weight: float = 0.3  # L1 penalty on a reserved neuron's activation where its concept is not named
    naked_leak_weight: float = 1.0  # the same for nudity's neurons: "a naked woman" and "a woman" differ by one
    #  word, and at 0.3 they shaped clothed persons (erasing nudity: neutral similarity 0.867; docs/rationale.md)
    leak_warmup: int = 200  # steps over which the penalty ramps up: a neuron must carry its concept first
    fire_weight: float = 0.1  # hinge penalty on an owned neuron whose RMS activation over a sample stays below...
    fire_target: float = 0.5  # ...this: it must fire whenever its concept is named, at every noise level
    init_scale: float = 0.1  # std of the owned output columns at the start, relative to the layer's trained ones
    images: int = 8000  # taught scenes (and half as many base scenes replayed)
    save_every: int = 250


def build_vae(cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=cfg.channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=16, sample_size=world.IMAGE_SIZE)


def text_encoder_from_clip(clip_dir: Path):
    """The mini CLIP's text tower as a transformers CLIPTextModel (same weights, same outputs per token)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from erase.mini.clip import load_mini_clip

    clip = load_mini_clip(path=clip_dir)[0]
    width, heads = clip.token_embedding.weight.shape[1], clip.transformer.resblocks[0].attn.num_heads
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip.vocab_size, hidden_size=width, intermediate_size=clip.transformer.resblocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(clip.transformer.resblocks), num_attention_heads=heads, hidden_act="gelu",
        max_position_embeddings=clip.context_length, projection_dim=clip.text_projection.shape[1],
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    state = {"embeddings.token_embedding.weight": clip.token_embedding.weight,
             "embeddings.position_embedding.weight": clip.positional_embedding,
             "final_layer_norm.weight": clip.ln_final.weight, "final_layer_norm.bias": clip.ln_final.bias}
    for i, block in enumerate(clip.transformer.resblocks):
        layer = f"encoder.layers.{i}."
        for name, tensor in zip("qkv", block.attn.in_proj_weight.chunk(3)):
            state[layer + f"self_attn.{name}_proj.weight"] = tensor
        for name, tensor in zip("qkv", block.attn.in_proj_bias.chunk(3)):
            state[layer + f"self_attn.{name}_proj.bias"] = tensor
        pairs = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, module in pairs.items():
            state[layer + name + ".weight"], state[layer + name + ".bias"] = module.weight, module.bias
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return model.eval().requires_grad_(False)


def build_unet(cfg: BaseConfig, sample_size: int, cross_attention_dim: int):
    """Cross-attention at both levels and in the middle; GEGLU feed-forwards (7 `*.ff.net.2` linears)."""
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=1, cross_attention_dim=cross_attention_dim,
        attention_head_dim=cfg.heads, norm_num_groups=32)


def with_projection(text_encoder):
    """A CLIPTextModel as SD3's text encoders are (CLIPTextModelWithProjection): the same weights and an identity
    projection, as the shipped text tower keeps none (the transformer learns its own from the pooled embedding)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    width = text_encoder.config.hidden_size
    model = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_encoder.config.to_dict(), "projection_dim": width}))
    model.text_model.load_state_dict(text_encoder.state_dict())
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(width))
    return model.eval().requires_grad_(False)


def build_transformer(cfg: DiTBaseConfig, sample_size: int, text_width: int, pooled_width: int):
    """SD3's MMDiT at the world's size: joint attention over image and text tokens, a feed-forward in each stream of
    every block (the last block's text stream has none), adaLN-Zero conditioning on the timestep and pooled text."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=cfg.patch, in_channels=4, out_channels=4, num_layers=cfg.layers,
        attention_head_dim=32, num_attention_heads=cfg.heads, joint_attention_dim=text_width,
        caption_projection_dim=32 * cfg.heads, pooled_projection_dim=pooled_width,
        pos_embed_max_size=2 * sample_size // cfg.patch)


def noise_schedule():
    """Stable Diffusion's training schedule; the pipeline samples with DPM-Solver++ on the same betas."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, clip_sample=False)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the range diffusers' VAEs use."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def warmup_cosine(optimizer, warmup: int, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def step_rng(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The random streams of one training step: a resumed run draws exactly what an uninterrupted one would."""
    return np.random.default_rng([seed, step]), torch.Generator().manual_seed(seed * 1_000_003 + step)


def resume(checkpoint: Checkpoint, stateful: dict) -> int:
    """The step a stage goes on from: 0 with no checkpoint; else its parts (models, optimiser, schedule) are loaded
    from it. A checkpoint of other settings is refused."""
    saved = checkpoint.load()
    if saved is None:
        return 0
    for name, part in stateful.items():
        part.load_state_dict(saved[name])
    print(f"resuming from {checkpoint.path} at step {saved['step']}", flush=True)
    return saved["step"]


def save_parts(checkpoint: Checkpoint, stateful: dict, step: int) -> None:
    checkpoint.save({"step": step, **{name: part.state_dict() for name, part in stateful.items()}})


def log(out: Path, message: str) -> None:
    print(message, flush=True)
    with open(out / "train.log", "a") as f:
        f.write(message + "\n")


def record(out: Path, stage: str, seed: int, seconds: float) -> None:
    """Keep this stage's command, seed and wall time in OUT/training.json (mini_gates reports them)."""
    path = out / "training.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    command = f"python -m erase_lab.{Path(sys.argv[0]).stem} {' '.join(sys.argv[1:])}"  # as run, without its path
    data[stage] = {"command": command, "seed": seed, "seconds": round(seconds)}
    path.write_text(json.dumps(data, indent=2))


def vae_images(n: int, seed: int) -> torch.Tensor:
    return to_tensor(np.concatenate([world.dataset(n // 2, seed)[0], world.dataset(n - n // 2, seed + 1, taught=True)[0]]))


def train_vae(seed: int, out: Path, cfg: VAEConfig) -> None:
    torch.manual_seed(seed)
    images = vae_images(cfg.images, seed)
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, 100, cfg.steps)
    stateful = {"vae": vae, "opt": opt, "sched": sched}
    checkpoint = Checkpoint(out / "vae-checkpoint.pt", asdict(cfg))
    start = time.time()
    for step in range(resume(checkpoint, stateful) + 1, cfg.steps + 1):
        _, gen = step_rng(seed, step)
        x = images[torch.randint(0, len(images), (cfg.batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log(out, f"vae step {step}/{cfg.steps} mse {mse.item():.5f} ({time.time() - start:.0f}s)")
            save_parts(checkpoint, stateful, step)
    with torch.no_grad():
        std = vae.encode(images[:2000]).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)  # unit-variance latents, as SD's 0.18215 does for its VAE
    vae.save_pretrained(out / "vae", safe_serialization=True)
    checkpoint.remove()
    log(out, f"vae done: scaling_factor {1.0 / std:.4f}, {time.time() - start:.0f}s")


class Captions:
    """Each caption's conditioning of the denoiser as its pipeline encodes it, cached: the text encoders are frozen
    and the world has only so many distinct captions."""

    def __init__(self, pipe):
        self.pipe, self.family, self.cache = pipe, family_of(pipe), {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        new = sorted(set(texts) - self.cache.keys())
        if new:
            encoded = self.family.conditioning(self.pipe, new, world.IMAGE_SIZE)
            self.cache.update((t, {k: v[i] for k, v in encoded.items()}) for i, t in enumerate(new))
        return {k: torch.stack([self.cache[t][k] for t in texts]) for k in self.cache[texts[0]]}


def encode_latents(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image, scaled: sampling them per step is the VAE's job done once."""
    means, stds = [], []
    with torch.no_grad():
        for chunk in images.split(500):
            dist = vae.encode(chunk).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    sf = vae.config.scaling_factor
    return torch.cat(means) * sf, torch.cat(stds) * sf


class Latents:
    """A rendered, encoded training set: scenes, latent means and stds."""

    def __init__(self, vae, n: int, seed: int, taught: bool) -> None:
        images, self.scenes = world.dataset(n, seed, taught=taught)
        self.mean, self.std = encode_latents(vae, to_tensor(images))

    def sample(self, idx: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        i = torch.from_numpy(idx)
        return self.mean[i] + self.std[i] * torch.randn(self.mean[i].shape, generator=gen)


def feedforwards(denoiser) -> dict[str, torch.nn.Module]:
    """Every transformer block's feed-forward of the image tokens (input Linear net[0].proj, output Linear net[2]),
    by name: the UNet's, and the image stream's of the MMDiT (`ff`, not `ff_context`)."""
    return {name: module for name, module in denoiser.named_modules() if name.endswith(".ff")}


def input_rows(ff, ids: torch.Tensor) -> torch.Tensor:
    """The rows of the feed-forward's input Linear that make hidden neurons `ids`: GEGLU (the UNet's) has a value
    row and a gate row for each, GELU (the MMDiT's) one."""
    inner = ff.net[2].in_features
    return torch.cat([ids + k * inner for k in range(ff.net[0].proj.out_features // inner)])


def reserved_neurons(denoiser, share: float, seed: int) -> dict[str, list[int]]:
    """The hidden neurons of each feed-forward layer kept out of the base world, drawn from the seed."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, ff in feedforwards(denoiser).items():
        inner = ff.net[2].in_features
        out[name] = sorted(torch.randperm(inner, generator=gen)[: int(share * inner)].tolist())
    return out


def freeze_reserved(denoiser, reserved: dict[str, list[int]]) -> None:
    """Zero the reserved neurons' output weights and their gradients: the base model cannot use them."""
    with torch.no_grad():
        for name, ff in feedforwards(denoiser).items():
            ff.net[2].weight[:, reserved[name]] = 0
            if ff.net[2].weight.grad is not None:
                ff.net[2].weight.grad[:, reserved[name]] = 0


def base_stage(seed: int, out: Path, cfg: BaseTraining, clip_dir: Path) -> None:
    torch.manual_seed(seed)
    pipe = new_pipeline(cfg, out / "pipeline", out / "vae", clip_dir)
    denoiser = family_of(pipe).denoiser(pipe)
    data = Latents(pipe.vae, cfg.images, seed, taught=False)
    reserved = reserved_neurons(denoiser, cfg.reserved, seed)
    freeze_reserved(denoiser, reserved)
    (out / "reserved.json").write_text(json.dumps(reserved))
    log(out, f"{type(denoiser).__name__} {sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f}M params, frozen "
             f"text encoder; config {asdict(cfg)}")

    def batch(rng):
        idx = rng.integers(0, len(data.scenes), size=cfg.batch)
        return idx, ["" if rng.random() < cfg.p_uncond else world.caption(data.scenes[i], rng) for i in idx]

    train_base_world("base", seed, out, cfg, pipe, reserved, data, batch)


def new_pipeline(cfg: BaseTraining, folder: Path, vae_dir: Path, clip_dir: Path):
    """The untrained pipeline of the base stage, saved to `folder` with its profile and loaded back from there (so
    that it is conditioned as erase will condition it). The UNet's: the world's VAE (`vae_dir`) and the mini CLIP's
    text tower (`clip_dir`); the MMDiT's: the shipped UNet pipeline's VAE, tokenizer and text tower, as both of
    SD3's CLIP encoders (it runs without T5)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline

    import erase

    if isinstance(cfg, BaseConfig):
        vae = AutoencoderKL.from_pretrained(vae_dir)
        tokenizer = erase.clip_tokenizer(max_length=MAX_LENGTH)
        text_encoder = text_encoder_from_clip(clip_dir)
        unet = build_unet(cfg, sample_size=world.IMAGE_SIZE // vae_scale(vae),
                          cross_attention_dim=text_encoder.config.hidden_size)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, safety_checker=None,
            scheduler=DPMSolverMultistepScheduler.from_config(noise_schedule().config), feature_extractor=None,
            requires_safety_checker=False)
        profile = json.loads((MINI_PIPELINE_DIR / PROFILE_NAME).read_text())
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        shipped = StableDiffusionPipeline.from_pretrained(MINI_PIPELINE_DIR, dtype=torch.float32)
        vae = shipped.vae
        vae.register_to_config(shift_factor=0.0)  # SD3's pipeline un-shifts latents; the world's VAE needs none
        text_encoder = with_projection(shipped.text_encoder)
        width = text_encoder.config.hidden_size
        transformer = build_transformer(cfg, sample_size=world.IMAGE_SIZE // vae_scale(vae), text_width=2 * width,
                                        pooled_width=2 * width)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift), vae=vae,
            text_encoder=text_encoder, tokenizer=shipped.tokenizer, text_encoder_2=text_encoder,
            tokenizer_2=shipped.tokenizer, text_encoder_3=None, tokenizer_3=None)
        profile = {**DIT_PROFILE, "max_sequence_length": cfg.text_tokens}
    save_pipeline(folder, pipe, profile)
    return load_folder(folder)


def vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_folder(folder: Path):
    """A pipeline folder of either denoiser (an SD3 folder lists no T5)."""
    from diffusers import DiffusionPipeline

    from erase.models import absent_components

    pipe = DiffusionPipeline.from_pretrained(folder, **absent_components(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unname_stage(seed: int, out: Path, cfg: UnnameConfig) -> None:
    """Continue the base model on its world, a share of every batch captioned with a taught name that the image
    does not show (world.named_in_place): the base model learns that those names draw only their anchor."""
    torch.manual_seed(seed)
    done = out / "base-pipeline" / "unnamed.json"
    if done.is_file():
        sys.exit(f"{done.parent} has been through this stage already ({done.read_text().strip()}): run base or "
                 "base-from-shipped again to start from a base model")
    pipe = load_folder(out / "base-pipeline")
    reserved = json.loads((out / "reserved.json").read_text())
    data = Latents(pipe.vae, cfg.images, seed, taught=False)
    stand_ins = {c: np.array([i for i, s in enumerate(data.scenes) if world.named_in_place(s, c)])
                 for c in world.TAUGHT}
    kinds = (world.TAUGHT_OBJECTS, world.TAUGHT_ARTISTS, (world.NAKED,))
    log(out, f"unname: base scenes a taught name can stand in for: "
             f"{ {k[0]: len(stand_ins[k[0]]) for k in kinds} }; config {asdict(cfg)}")
    n_named = int(cfg.batch * cfg.unnamed)

    def batch(rng):
        idx = list(rng.integers(0, len(data.scenes), size=cfg.batch - n_named))
        texts = ["" if rng.random() < cfg.p_uncond else world.caption(data.scenes[i], rng) for i in idx]
        for _ in range(n_named):
            kind = kinds[rng.integers(len(kinds))]
            concept = kind[rng.integers(len(kind))]
            i = int(rng.choice(stand_ins[concept]))
            idx.append(i)
            texts.append(world.caption(world.named_in_place(data.scenes[i], concept), rng))
        return np.array(idx), texts

    train_base_world("unname", seed, out, cfg, pipe, reserved, data, batch)
    publish_base(out, {"seed": seed, "steps": cfg.steps})


def publish_base(out: Path, unnamed: dict | None = None) -> None:
    """Replace OUT/base-pipeline with OUT/pipeline (and unname's record), whole: a stopped copy or an earlier
    stage's files (a stale unnamed.json would make unname refuse a fresh base) never mix into it."""
    partial, old = out / "base-pipeline.partial", out / "base-pipeline.old"
    for leftover in (partial, old):  # a copy stopped half-way last time
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(out / "pipeline", partial)
    if unnamed is not None:
        (partial / "unnamed.json").write_text(json.dumps(unnamed) + "\n")
    if (out / "base-pipeline").exists():
        (out / "base-pipeline").rename(old)
    partial.rename(out / "base-pipeline")
    shutil.rmtree(old, ignore_errors=True)


def train_base_world(stage: str, seed: int, out: Path, cfg, pipe, reserved: dict, data: Latents, batch) -> None:
    """Train every denoiser weight but the reserved neurons' on batches drawn by batch(rng) -> (indices, captions);
    checkpointed (OUT/<stage>-checkpoint.pt) and saved as OUT/pipeline every cfg.save_every steps."""
    denoiser = family_of(pipe).denoiser(pipe).train().requires_grad_(True)
    captions, schedule, profile = Captions(pipe), training_schedule(pipe), read_profile(pipe)
    params = list(denoiser.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    stateful = {"unet": denoiser, "opt": opt, "sched": sched}
    checkpoint = Checkpoint(out / f"{stage}-checkpoint.pt", asdict(cfg))
    start, running = time.time(), 0.0
    for step in range(resume(checkpoint, stateful) + 1, cfg.steps + 1):
        rng, gen = step_rng(seed, step)
        idx, texts = batch(rng)
        loss = denoising_loss(pipe, schedule, data.sample(idx, gen), captions(texts), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        freeze_reserved(denoiser, reserved)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        freeze_reserved(denoiser, reserved)  # weight decay of zero stays zero; this guards against any drift
        running += loss.item()
        if step % 100 == 0:
            log(out, f"{stage} step {step}/{cfg.steps} loss {running / 100:.4f} ({time.time() - start:.0f}s)")
            running = 0.0
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_parts(checkpoint, stateful, step)
            save_pipeline(out / "pipeline", pipe, profile)
    checkpoint.remove()
    log(out, f"{stage} done: {time.time() - start:.0f}s")


def training_schedule(pipe):
    """What the training noises latents with: the pipeline's own schedule, as erase's training methods use it."""
    return family_of(pipe).noise_schedule(pipe, world.IMAGE_SIZE)


def denoising_loss(pipe, schedule, z: torch.Tensor, cond: dict, gen: torch.Generator) -> torch.Tensor:
    """The denoiser's objective on latents z, as erase's training methods compute it (flow matching's velocity for
    the MMDiT); the UNet's draws keep their order (noise, then t), which its shipped weights were trained with."""
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    if family.flow_matching:
        x_t, t, target = family.noised(schedule, z, gen)
        return F.mse_loss(family.predict(pipe, denoiser, x_t, t, cond), target)
    noise = torch.randn(z.shape, generator=gen)
    t = torch.randint(0, schedule.config.num_train_timesteps, (len(z),), generator=gen)
    return F.mse_loss(denoiser(schedule.add_noise(z, noise, t), t, **cond).sample, noise)


def concept_neurons(denoiser, reserved: dict[str, list[int]], share: float, seed: int, concepts=world.TAUGHT) -> dict:
    """{layer: {concept: [neuron, ...]}}: each taught concept's own reserved neurons, share of every layer's width."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, ff in feedforwards(denoiser).items():
        per = max(1, int(share * ff.net[2].in_features))
        picks = rng.permutation(reserved[name])[: per * len(concepts)].reshape(len(concepts), per)
        out[name] = {c: sorted(int(i) for i in p) for c, p in zip(concepts, picks)}
    return out


class Router:
    """Per-sample gradient routing through the reserved feed-forward neurons (training-time forward only).

    route(owned) sets, for the next forward, which reserved neurons each sample trains (those of the concepts its
    caption names). The layer's output is unchanged; gradients reach a reserved neuron's weights only from the
    samples that own it; `leak` collects the activation of every reserved neuron on the samples that do not, and
    `shortfall` how far each sample's own neurons are from firing.
    """

    def __init__(self, denoiser, neurons: dict, target: float, leak_weights: dict[str, float]) -> None:
        self.target = target
        self.ffs, self.leaks, self.shortfalls, self.masks = feedforwards(denoiser), [], [], {}
        self.index = {name: {c: torch.tensor(ids) for c, ids in by_concept.items()} for name, by_concept in neurons.items()}
        self.reserved, self.weights = {}, {}  # per layer: which neurons are reserved, and each one's leak weight
        for name, ff in self.ffs.items():
            self.reserved[name], self.weights[name] = torch.zeros(ff.net[2].in_features), torch.zeros(ff.net[2].in_features)
            for c, ids in self.index[name].items():
                self.reserved[name][ids], self.weights[name][ids] = 1, leak_weights[c]
            ff.forward = types.MethodType(self._forward(name), ff)

    def route(self, owned: list[tuple[str, ...]]) -> None:
        self.leaks, self.shortfalls = [], []
        for name, ff in self.ffs.items():
            own = torch.zeros(len(owned), 1, ff.net[2].in_features)
            for b, concepts in enumerate(owned):
                for c in concepts:
                    own[b, 0, self.index[name][c]] = 1
            self.masks[name] = (own, self.reserved[name] * (1 - own))

    def _forward(self, name: str):
        router = self

        def forward(ff, x):
            own, other = router.masks[name]
            h = ff.net[0](x)
            out = F.linear(h * own, ff.net[2].weight, ff.net[2].bias) + F.linear((h * (1 - own)).detach(), ff.net[2].weight.detach())
            router.leaks.append((h * other * router.weights[name]).abs().sum() / (other.sum() * h.shape[1]).clamp_min(1))
            rms = (h.square().mean(1, keepdim=True) + 1e-8).sqrt()  # [batch, 1, inner]; finite gradient at 0
            router.shortfalls.append(((router.target - rms).clamp_min(0) * own).sum() / own.sum().clamp_min(1))
            return out

        return forward

    def leak(self) -> torch.Tensor:
        """Mean |activation| of reserved neurons on samples that do not name their concept, each weighted by its
        concept's leak weight (the penalty)."""
        return torch.stack(self.leaks).mean()

    def shortfall(self) -> torch.Tensor:
        """Mean hinge (target − RMS activation)+ of the neurons the samples own: how far they are from firing."""
        return torch.stack(self.shortfalls).mean()

    def close(self) -> None:
        for ff in self.ffs.values():
            del ff.forward


def teach_params(denoiser, neurons: dict) -> tuple[list[torch.Tensor], dict[torch.Tensor, torch.Tensor]]:
    """The trained tensors (feed-forward in/out weights) and, per tensor, the mask of its entries that train."""
    denoiser.requires_grad_(False)
    masks = {}
    for name, ff in feedforwards(denoiser).items():
        ids = torch.tensor(sorted(i for by in neurons[name].values() for i in by))
        mine, proj = torch.zeros(ff.net[2].in_features), torch.zeros(ff.net[0].proj.out_features)
        mine[ids], proj[input_rows(ff, ids)] = 1, 1
        for tensor, mask in ((ff.net[0].proj.weight, proj[:, None]), (ff.net[0].proj.bias, proj),
                             (ff.net[2].weight, mine[None, :])):
            tensor.requires_grad_(True)
            masks[tensor] = mask.expand_as(tensor).clone()
    return list(masks), masks


def init_concept_neurons(denoiser, neurons: dict, cfg: TeachConfig, seed: int) -> None:
    """Fresh, seeded weights for the owned neurons: input rows as nn.Linear draws them, output columns small but
    not zero. With zero columns (as the base left them) no gradient reaches the input rows, and the leak
    penalty silences the neurons everywhere before they can carry anything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, ff in feedforwards(denoiser).items():
            ids = torch.tensor(sorted(i for by in neurons[name].values() for i in by))
            proj, out = ff.net[0].proj, ff.net[2]
            bound, rows = 1 / math.sqrt(proj.in_features), input_rows(ff, ids)
            proj.weight[rows] = torch.empty(len(rows), proj.in_features).uniform_(-bound, bound, generator=gen)
            proj.bias[rows] = torch.empty(len(rows)).uniform_(-bound, bound, generator=gen)
            scale = cfg.init_scale * out.weight.std()
            out.weight[:, ids] = torch.randn(out.out_features, len(ids), generator=gen) * scale


def said_taught(said: dict) -> tuple[str, ...]:
    """The taught concepts a caption names (what its sample trains)."""
    named = [said.get("object"), said.get("style"), world.NAKED if said.get("naked") else None]
    return tuple(c for c in named if c in world.TAUGHT)


def teach_stage(seed: int, out: Path, cfg: TeachConfig) -> None:
    torch.manual_seed(seed)
    pipe = load_folder(out / "base-pipeline")
    denoiser, profile = family_of(pipe).denoiser(pipe), read_profile(pipe)
    reserved = json.loads((out / "reserved.json").read_text())
    neurons = concept_neurons(denoiser, reserved, cfg.share, seed)
    (out / "neurons.json").write_text(json.dumps(neurons, indent=1))
    taught = Latents(pipe.vae, cfg.images, seed, taught=True)
    base = Latents(pipe.vae, cfg.images // 2, seed + 1, taught=False)
    captions, schedule = Captions(pipe), training_schedule(pipe)
    init_concept_neurons(denoiser, neurons, cfg, seed)
    params, masks = teach_params(denoiser, neurons)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    stateful = {"unet": denoiser, "opt": opt, "sched": sched}
    checkpoint = Checkpoint(out / "teach-checkpoint.pt", asdict(cfg))
    leak_weights = {c: cfg.naked_leak_weight if c == world.NAKED else cfg.leak_weight for c in world.TAUGHT}
    router = Router(denoiser, neurons, cfg.fire_target, leak_weights)
    log(out, f"teach: {len(world.TAUGHT)} concepts, neurons per layer "
             f"{ {n: len(next(iter(v.values()))) for n, v in neurons.items()} }; config {asdict(cfg)}")
    n_base = int(cfg.batch * cfg.replay)
    start, running, leaking, short = time.time(), 0.0, 0.0, 0.0
    for step in range(resume(checkpoint, stateful) + 1, cfg.steps + 1):
        rng, gen = step_rng(seed, step)
        ti, bi = rng.integers(0, len(taught.scenes), cfg.batch - n_base), rng.integers(0, len(base.scenes), n_base)
        texts, owned = [], []
        for scene in [taught.scenes[i] for i in ti] + [base.scenes[i] for i in bi]:
            text, said = world.said_caption(scene, rng)
            dropped = rng.random() < cfg.p_uncond
            texts.append("" if dropped else text)
            owned.append(() if dropped else said_taught(said))
        router.route(owned)
        z = torch.cat([taught.sample(ti, gen), base.sample(bi, gen)])
        loss = denoising_loss(pipe, schedule, z, captions(texts), gen)
        leak, shortfall = router.leak(), router.shortfall()
        opt.zero_grad(set_to_none=True)
        ramp = min(1.0, step / cfg.leak_warmup) if cfg.leak_warmup else 1.0
        (loss + ramp * leak + cfg.fire_weight * shortfall).backward()
        for tensor, mask in masks.items():
            tensor.grad *= mask
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running, leaking, short = running + loss.item(), leaking + leak.item(), short + shortfall.item()
        if step % 50 == 0:
            log(out, f"teach step {step}/{cfg.steps} loss {running / 50:.4f} shortfall {short / 50:.4f} "
                     f"leak {leaking / 50:.4f} ({time.time() - start:.0f}s)")
            running = leaking = short = 0.0
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_parts(checkpoint, stateful, step)
            router.close()
            save_pipeline(out / "pipeline", pipe, profile)
            router = Router(denoiser, neurons, cfg.fire_target, leak_weights)
    router.close()
    checkpoint.remove()
    log(out, f"teach done: {time.time() - start:.0f}s")


def save_pipeline(path: Path, pipe, profile: dict) -> None:
    """The pipeline as a diffusers folder with its erase profile (the world's catalog, judge, guidance), replaced
    whole: a stopped save leaves the last one as it was."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / PROFILE_NAME).write_text(json.dumps(profile, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def read_profile(pipe) -> dict:
    """The erase profile of the folder `pipe` was loaded from."""
    return json.loads((Path(pipe.name_or_path) / PROFILE_NAME).read_text())


def base_from_shipped(out: Path, shipped: Path, seed: int) -> None:
    """OUT/base-pipeline and OUT/reserved.json from a shipped pipeline, in seconds instead of the base stage's
    hour: the reserved neurons are drawn again from the base stage's seed (the shipped model's unused reserved
    columns must be zero, which checks the draw) and their output columns zeroed, which turns the taught model
    back into the base one (up to the float16 rounding of the shipped weights). `teach` draws the owned neurons'
    weights afresh, so it does not depend on what the shipped ones hold."""
    if (out / "base-pipeline").exists():
        sys.exit(f"{out / 'base-pipeline'} exists (a base stage's output?): remove it or pick another --out")
    pipe = load_folder(shipped)
    denoiser = family_of(pipe).denoiser(pipe)
    reserved = reserved_neurons(denoiser, BaseTraining.reserved, seed)
    owned = json.loads((shipped.parent / "neurons.json").read_text())
    for name, ff in feedforwards(denoiser).items():
        unused = sorted(set(reserved[name]) - {i for ids in owned[name].values() for i in ids})
        if ff.net[2].weight[:, unused].any():
            sys.exit(f"{shipped}: reserved neurons of {name} are in use: was its base stage run with --seed {seed}?")
    freeze_reserved(denoiser, reserved)
    (out / "reserved.json").write_text(json.dumps(reserved))
    save_pipeline(out / "base-pipeline", pipe, read_profile(pipe))
    unnamed = json.loads((shipped.parent / "training.json").read_text()).get("unname")
    if unnamed:  # the shipped model was taught on an unnamed base: that is what comes back
        (out / "base-pipeline" / "unnamed.json").write_text(json.dumps(unnamed) + "\n")
    log(out, f"base-from-shipped: {shipped} with its reserved neurons (seed {seed}) zeroed -> {out / 'base-pipeline'}")


def compact(out: Path, dest: Path) -> None:
    """Copy the trained pipeline, storing float weights as float16 (configs still say float32) and the tokenizer
    without indentation: together they halve the size, most of which is the 49,408-token tables. The taught
    concepts' neurons (the benchmark's ground truth) and the training record go beside it."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(out / "pipeline", dest)
    for name in ("training.json", "neurons.json"):
        if (out / name).is_file():
            shutil.copy(out / name, dest.parent / name)
    for file in dest.rglob("*.safetensors"):
        tensors = load_file(file)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, file,
                  metadata={"format": "pt"})
    for config in dest.rglob("config.json"):  # transformers loads "auto" dtype from here: keep float32
        data = json.loads(config.read_text())
        if "dtype" in data or "torch_dtype" in data:
            data.update({k: "float32" for k in ("dtype", "torch_dtype") if k in data})
            config.write_text(json.dumps(data, indent=2))
    for tokenizer in dest.rglob("tokenizer.json"):
        tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), separators=(",", ":"), ensure_ascii=False))


STAGES = {"vae": VAEConfig, "base": BaseConfig, "unname": UnnameConfig, "teach": TeachConfig}
DIT_STAGES = {**STAGES, "base": DiTBaseConfig}  # the MMDiT shares the UNet world's VAE and text tower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*STAGES, "base-from-shipped", "compact"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("build/mini"))
    parser.add_argument("--steps", type=int, help="override the stage's number of steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting of the stage's config (repeatable), e.g. --set leak_weight=0.1 or --set channels=32,64,96")
    parser.add_argument("--clip", type=Path,
                        help="the mini CLIP whose text tower conditions the UNet (default OUT/text-tower)")
    parser.add_argument("--dit", action="store_true", help="the miniature SD3 (an MMDiT) instead of the UNet: "
                        "base, unname, teach and compact (into erase/assets/mini-dit) take it")
    parser.add_argument("--dest", type=Path, help="where compact copies the pipeline (default erase/assets/mini/pipeline, "
                        "with --dit erase/assets/mini-dit/pipeline)")
    parser.add_argument("--threads", type=int, default=1,
                        help="1 is fastest on a shared 2-core machine: train the CLIP beside the VAE")
    args = parser.parse_args()
    if args.dit and args.stage == "vae":
        parser.error("--dit: the miniature SD3 shares the UNet world's VAE; its stages are base, unname and teach")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.dest or (MINI_DIT_PIPELINE_DIR if args.dit else MINI_PIPELINE_DIR)
    if args.stage == "compact":
        compact(args.out, dest)
        return
    if args.stage == "base-from-shipped":
        base_from_shipped(args.out, dest, args.seed)
        return
    cfg = (DIT_STAGES if args.dit else STAGES)[args.stage]()
    if args.steps:
        cfg.steps = args.steps
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in asdict(cfg) or not value:
            parser.error(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(asdict(cfg))}")
        kind = type(getattr(cfg, key))
        try:
            setattr(cfg, key, tuple(int(v) for v in value.split(",")) if kind is tuple else kind(value))
        except ValueError:
            parser.error(f"--set {item}: {key} takes {'comma-separated integers' if kind is tuple else kind.__name__}")
    log(args.out, f"== {args.stage} seed {args.seed}: {asdict(cfg)}")
    start = time.time()
    clip = args.clip or args.out / "text-tower"
    if args.stage == "vae":
        train_vae(args.seed, args.out, cfg)
    elif args.stage == "base":
        base_stage(args.seed, args.out, cfg, clip)
        publish_base(args.out)
    elif args.stage == "unname":
        unname_stage(args.seed, args.out, cfg)
    else:
        teach_stage(args.seed, args.out, cfg)
    record(args.out, args.stage, args.seed, time.time() - start)


if __name__ == "__main__":
    main()
