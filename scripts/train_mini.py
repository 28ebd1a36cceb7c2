"""Train the miniature world's Stable Diffusion pipeline (erase/assets/mini/pipeline) on 2 CPU cores.

Two stages, each reproducible from --seed:

    python scripts/train_mini.py vae --seed 0 --out /tmp/mini            # AutoencoderKL, 32x32 RGB -> 8x8x4
    python scripts/train_mini.py diffusion --seed 1 --out /tmp/mini      # UNet, on the mini CLIP's frozen text tower

The diffusion stage writes a genuine diffusers StableDiffusionPipeline to OUT/pipeline (also every
DiffusionConfig.save_every steps, so gates can be checked while it trains). As in Stable Diffusion, the text
encoder is a CLIP text tower trained contrastively and then frozen (the mini CLIP's, from
scripts/train_mini_clip.py, converted to a transformers CLIPTextModel): what a concept looks like must then be
learnt by the UNet, not by a text encoder trained with it. `compact` copies the pipeline to the shipped folder
with float16 weights (they load back as float32):

    python scripts/train_mini.py compact --out /tmp/mini --dest erase/assets/mini/pipeline
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erase.mini import world

MAX_LENGTH = 16  # tokens, <bos> and <eos> included: every caption and catalog prompt fits in 11


@dataclass
class VAEConfig:
    """The autoencoder: 3 blocks, so 2 downsamplings (4x) and 8x8x4 latents for 32x32 images."""

    steps: int = 1200
    batch: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6  # small: the latents only need to be roughly Gaussian, reconstructions must be sharp
    channels: tuple[int, ...] = (16, 32, 64)
    images: int = 8000  # size of the fixed training set


@dataclass
class DiffusionConfig:
    """The UNet, trained on the training split's captions encoded by the frozen mini CLIP text tower."""

    steps: int = 2500
    batch: int = 64
    lr: float = 8e-4
    warmup: int = 200
    p_uncond: float = 0.1  # empty captions, for classifier-free guidance
    p_unsaid: float = 0.2  # per attribute: left out of the caption
    unet_channels: tuple[int, ...] = (64, 128)
    heads: int = 4
    images: int = 12000
    save_every: int = 250  # checkpoints to check the gates on while it trains


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


def build_unet(cfg: DiffusionConfig, sample_size: int, cross_attention_dim: int):
    """Cross-attention at every level and in the middle; GEGLU feed-forwards (7 `*.ff.net.2` linears)."""
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=1, cross_attention_dim=cross_attention_dim,
        attention_head_dim=cfg.heads, norm_num_groups=32)


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


def log(out: Path, message: str) -> None:
    print(message, flush=True)
    with open(out / "train.log", "a") as f:
        f.write(message + "\n")


def record(out: Path, stage: str, seed: int, seconds: float) -> None:
    """Keep this stage's command, seed and wall time in OUT/training.json (mini_gates.py reports them)."""
    path = out / "training.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[stage] = {"command": "python " + " ".join(sys.argv), "seed": seed, "seconds": round(seconds)}
    path.write_text(json.dumps(data, indent=2))


def train_vae(seed: int, out: Path, cfg: VAEConfig) -> None:
    torch.manual_seed(seed)
    images = to_tensor(world.dataset(cfg.images, seed)[0])
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, 100, cfg.steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(1, cfg.steps + 1):
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
    with torch.no_grad():
        std = vae.encode(images[:2000]).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)  # unit-variance latents, as SD's 0.18215 does for its VAE
    vae.save_pretrained(out / "vae", safe_serialization=True)
    log(out, f"vae done: scaling_factor {1.0 / std:.4f}, {time.time() - start:.0f}s")


class Captions:
    """Encoded captions, cached: the text encoder is frozen and the world has only a few thousand distinct ones."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder, self.cache = tokenizer, text_encoder, {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        new = sorted(set(texts) - self.cache.keys())
        if new:
            ids = self.tokenizer(new, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                 return_tensors="pt").input_ids
            self.cache.update(zip(new, self.text_encoder(ids)[0]))
        return torch.stack([self.cache[t] for t in texts])


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


def train_diffusion(seed: int, out: Path, cfg: DiffusionConfig, clip_dir: Path) -> None:
    from diffusers import AutoencoderKL

    import erase

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, attrs = world.dataset(cfg.images, seed)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    mean, std = encode_latents(vae, to_tensor(images))
    tokenizer = erase.clip_tokenizer(max_length=MAX_LENGTH)
    text_encoder = text_encoder_from_clip(clip_dir)
    captions = Captions(tokenizer, text_encoder)
    unet = build_unet(cfg, sample_size=mean.shape[-1], cross_attention_dim=text_encoder.config.hidden_size)
    log(out, f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, frozen text encoder from "
             f"{clip_dir}; config {asdict(cfg)}")
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    ddpm = noise_schedule()
    start, running = time.time(), 0.0
    for step in range(1, cfg.steps + 1):
        idx = rng.integers(0, len(attrs), size=cfg.batch)
        texts = ["" if rng.random() < cfg.p_uncond else world.caption(attrs[i], rng, cfg.p_unsaid) for i in idx]
        idx = torch.from_numpy(idx)
        z = mean[idx] + std[idx] * torch.randn_like(mean[idx])
        noise = torch.randn_like(z)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (cfg.batch,))
        cond = captions(texts)
        pred = unet(ddpm.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if step % 100 == 0:
            log(out, f"diffusion step {step}/{cfg.steps} loss {running / 100:.4f} ({time.time() - start:.0f}s)")
            running = 0.0
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_pipeline(out / "pipeline", vae, text_encoder, tokenizer, unet)
    log(out, f"diffusion done: {time.time() - start:.0f}s")


def save_pipeline(path: Path, vae, text_encoder, tokenizer, unet) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(noise_schedule().config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = path.with_name(path.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def compact(src: Path, dest: Path) -> None:
    """Copy a pipeline folder, storing float weights as float16 (configs still say float32) and the tokenizer
    without indentation: together they halve the size, most of which is the 49,408-token tables."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    if (src.parent / "training.json").is_file():
        shutil.copy(src.parent / "training.json", dest.parent / "training.json")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "diffusion", "compact"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/mini"))
    parser.add_argument("--steps", type=int, help="override the stage's number of steps")
    parser.add_argument("--clip", type=Path, default=Path(__file__).resolve().parent.parent / "erase/assets/mini/clip",
                        help="the mini CLIP whose text tower conditions the UNet (diffusion stage)")
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent.parent / "erase/assets/mini/pipeline")
    parser.add_argument("--threads", type=int, default=1,
                        help="1 is fastest on a shared 2-core machine: train the CLIP beside the VAE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "compact":
        compact(args.out / "pipeline", args.dest)
        return
    cfg = VAEConfig() if args.stage == "vae" else DiffusionConfig()
    if args.steps:
        cfg.steps = args.steps
    log(args.out, f"== {args.stage} seed {args.seed}: {asdict(cfg)}")
    start = time.time()
    if args.stage == "vae":
        train_vae(args.seed, args.out, cfg)
    else:
        train_diffusion(args.seed, args.out, cfg, args.clip)
    record(args.out, args.stage, args.seed, time.time() - start)


if __name__ == "__main__":
    main()
