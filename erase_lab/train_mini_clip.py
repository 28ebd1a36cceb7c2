"""Train the miniature world's CLIP judge (erase/assets/mini/clip) contrastively on 1 CPU core.

    python -m erase_lab.train_mini_clip --seed 2 --out build/mini/clip     # then copy to erase/assets/mini/clip

It sees the whole world, taught concepts and held-out combinations included: it judges the pipeline, it is not
judged. A caption is a positive for every image it describes ("a photo of a church" for every church in the
batch, whatever its ground or rendering; world.describes): the loss is a multi-positive InfoNCE with those soft
targets. Images are blurred and noised at random, so the judge also reads the slightly soft images a diffusion
model draws. A run saves a checkpoint every --save-every steps and resumes from it when started again.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erase.mini import world
from erase.mini.clip import CONFIG, build_clip, transforms
from erase.training import Checkpoint

from .train_mini import record, resume, save_parts, step_rng


@dataclass
class ClipConfig:
    """Training of the mini CLIP."""

    steps: int = 2400
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    p_unsaid: float = 0.35  # the place is left out of the caption (zero-shot prompts name one attribute)
    images: int = 16000  # half of the base world, half showing taught concepts; held-out pairs in proportion
    # The UNet's frozen text encoder is this CLIP at step text_tower_at (written to OUT/../text-tower), so the UNet
    # trains while the judge goes on learning (SD's text encoder and its evaluator's CLIP are different models too).
    # The learning rate stays flat until then, so the tower does not depend on how long the judge trains.
    text_tower_at: int = 300
    max_noise: float = 0.15  # std of added Gaussian noise, in [-1, 1] pixel units, drawn uniformly per image
    p_blur: float = 0.3


def world_images(n: int, seed: int) -> tuple[torch.Tensor, list[world.Scene]]:
    """n images, half from the base world and half showing taught concepts, 1 in 10 of held-out pairs."""
    parts = [world.dataset(n * 9 // 20, seed, taught=False), world.dataset(n * 9 // 20, seed + 1, taught=True),
             world.dataset(n // 20, seed + 2, taught=False, held_out=True),
             world.dataset(n - 2 * (n * 9 // 20) - n // 20, seed + 3, taught=True, held_out=True)]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [s for p in parts for s in p[1]]


def augment(x: torch.Tensor, cfg: ClipConfig, gen: torch.Generator) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    blur = torch.rand(len(x), 1, 1, 1, generator=gen) < cfg.p_blur
    x = torch.where(blur, blurred, x)
    return x + torch.rand(len(x), 1, 1, 1, generator=gen) * cfg.max_noise * torch.randn(x.shape, generator=gen)


def consistent(said: list[dict], scenes: list[world.Scene]) -> torch.Tensor:
    """M[i, j] = 1 when caption i (what it says) describes image j."""
    return torch.tensor([[float(world.describes(s, scene)) for scene in scenes] for s in said])


def schedule(optimizer, cfg: ClipConfig):
    """Linear warmup, flat until the text tower is taken, then a cosine decay to the last step (train_mini's
    warmup_cosine has no flat part: the UNet's stages decay from the end of warmup)."""
    def factor(s: int) -> float:
        decay = max(0, s - cfg.text_tower_at) / max(1, cfg.steps - cfg.text_tower_at)
        return min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(decay, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    logits = scale * txt @ img.T  # captions x images
    t2i = -(F.log_softmax(logits, dim=1) * m / m.sum(1, keepdim=True)).sum(1).mean()
    i2t = -(F.log_softmax(logits.T, dim=1) * m.T / m.T.sum(1, keepdim=True)).sum(1).mean()
    return (t2i + i2t) / 2


def train(seed: int, out: Path, cfg: ClipConfig, save_every: int) -> None:
    torch.manual_seed(seed)
    images, scenes = world_images(cfg.images, seed)
    model = build_clip()
    _, tokenizer = transforms()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    sched = schedule(opt, cfg)
    stateful = {"model": model, "opt": opt, "sched": sched}
    checkpoint = Checkpoint(out / "checkpoint.pt", asdict(cfg))
    start, running = time.time(), 0.0
    for step in range(resume(checkpoint, stateful) + 1, cfg.steps + 1):
        rng, gen = step_rng(seed, step)
        idx = rng.integers(0, len(scenes), size=cfg.batch)
        batch = [scenes[i] for i in idx]
        texts, said = zip(*(world.said_caption(s, rng, cfg.p_unsaid) for s in batch))
        img = model.encode_image(augment(images[torch.from_numpy(idx)], cfg, gen), normalize=True)
        txt = model.encode_text(tokenizer(list(texts)), normalize=True)
        loss = contrastive_loss(img, txt, model.logit_scale.exp(), consistent(list(said), batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if step % 100 == 0:
            print(f"clip step {step}/{cfg.steps} loss {running / 100:.4f} ({time.time() - start:.0f}s)", flush=True)
            running = 0.0
        if step % save_every == 0:
            save_parts(checkpoint, stateful, step)
        if step == cfg.text_tower_at:
            save(model, out.parent / "text-tower")
    save(model, out)
    checkpoint.remove()
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
    parser.add_argument("--out", type=Path, default=Path("build/mini/clip"))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=250, help="checkpoint interval (a stopped run resumes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ClipConfig()
    if args.steps:
        cfg.steps = args.steps
    if cfg.steps < cfg.text_tower_at:
        parser.error(f"--steps must be at least {cfg.text_tower_at}: the UNet's text tower is taken at that step")
    print(f"== clip seed {args.seed}: {asdict(cfg)}", flush=True)
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    train(args.seed, args.out, cfg, args.save_every)
    record(args.out.parent, "clip", args.seed, time.time() - start)


if __name__ == "__main__":
    main()
