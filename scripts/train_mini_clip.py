"""Train the miniature world's CLIP judge (erase/assets/mini/clip) contrastively on 1 CPU core.

    python scripts/train_mini_clip.py --seed 2 --out /tmp/mini/clip     # then copy to erase/assets/mini/clip

It sees every attribute combination, held-out ones included: it judges the pipeline, it is not judged. Captions
leave attributes unsaid at random, so a caption is a positive for every image it describes ("a circle" for all
circles in the batch): the loss is a multi-positive InfoNCE with those soft targets. Images are blurred and
noised at random, so the judge also reads the slightly soft images a diffusion model draws.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from train_mini import record, warmup_cosine

from erase.mini import world
from erase.mini.clip import CONFIG, build_clip, transforms


@dataclass
class ClipConfig:
    """Training of the mini CLIP."""

    steps: int = 2500
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    p_unsaid: float = 0.35  # per attribute: left out of the caption (zero-shot prompts name one attribute)
    images: int = 12000
    max_noise: float = 0.15  # std of added Gaussian noise, in [-1, 1] pixel units, drawn uniformly per image
    p_blur: float = 0.3


def world_images(n: int, seed: int) -> tuple[torch.Tensor, list[world.Attributes]]:
    """n images from both splits in proportion to their number of combinations, as [-1, 1] tensors."""
    n_held = n * len(world.combinations(True)) // (len(world.combinations()) + len(world.combinations(True)))
    train, train_attrs = world.dataset(n - n_held, seed)
    held, held_attrs = world.dataset(n_held, seed + 1, held_out=True)
    images = torch.from_numpy(np.concatenate([train, held])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, train_attrs + held_attrs


def augment(x: torch.Tensor, cfg: ClipConfig, gen: torch.Generator) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    blur = torch.rand(len(x), 1, 1, 1, generator=gen) < cfg.p_blur
    x = torch.where(blur, blurred, x)
    return x + torch.rand(len(x), 1, 1, 1, generator=gen) * cfg.max_noise * torch.randn(x.shape, generator=gen)


def consistent(said: list[dict], attrs: list[world.Attributes]) -> torch.Tensor:
    """M[i, j] = 1 when caption i (its said attributes) describes image j."""
    m = torch.ones(len(said), len(attrs))
    for name in ("shape", "colour", "style"):
        values = np.array([getattr(a, name) for a in attrs])
        for i, s in enumerate(said):
            if s[name] is not None:
                m[i] *= torch.from_numpy(values == s[name]).float()
    return m


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    logits = scale * txt @ img.T  # captions x images
    t2i = -(F.log_softmax(logits, dim=1) * m / m.sum(1, keepdim=True)).sum(1).mean()
    i2t = -(F.log_softmax(logits.T, dim=1) * m.T / m.T.sum(1, keepdim=True)).sum(1).mean()
    return (t2i + i2t) / 2


def train(seed: int, out: Path, cfg: ClipConfig) -> None:
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    images, attrs = world_images(cfg.images, seed)
    model = build_clip()
    _, tokenizer = transforms()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    start, running = time.time(), 0.0
    for step in range(1, cfg.steps + 1):
        idx = rng.integers(0, len(attrs), size=cfg.batch)
        batch_attrs = [attrs[i] for i in idx]
        said = [world.mention(a, rng, cfg.p_unsaid) for a in batch_attrs]
        img = model.encode_image(augment(images[torch.from_numpy(idx)], cfg, gen), normalize=True)
        txt = model.encode_text(tokenizer([world.describe(**s) for s in said]), normalize=True)
        loss = contrastive_loss(img, txt, model.logit_scale.exp(), consistent(said, batch_attrs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if step % 100 == 0:
            print(f"clip step {step}/{cfg.steps} loss {running / 100:.4f} ({time.time() - start:.0f}s)", flush=True)
            running = 0.0
    save(model, out)
    print(f"clip done: {time.time() - start:.0f}s", flush=True)


def save(model, out: Path) -> None:
    """config.json + float16 model.safetensors (the 49,408-token table dominates; float16 halves it)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/mini/clip"))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ClipConfig()
    if args.steps:
        cfg.steps = args.steps
    print(f"== clip seed {args.seed}: {asdict(cfg)}", flush=True)
    start = time.time()
    train(args.seed, args.out, cfg)
    record(args.out.parent, "clip", args.seed, time.time() - start)


if __name__ == "__main__":
    main()
