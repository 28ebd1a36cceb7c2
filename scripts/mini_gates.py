"""Check the miniature world's quality gates and record them in BENCHMARKS.md ("Miniature world").

    HF_HUB_OFFLINE=1 python scripts/mini_gates.py [--pipeline DIR] [--clip DIR] [--n 96]

Gates (accuracy per attribute, judged by the mini CLIP's zero-shot classification):
  - the mini CLIP on fresh procedural images of every combination: >= 95%;
  - the mini pipeline on fresh seeds (25 steps, CFG) for training combinations: shape/colour >= 85%, style >= 80%;
  - the mini pipeline on the combinations held out of its training: >= 70%.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from erase.mini import world
from erase.mini.clip import CLIP_DIR, load_mini_clip, zero_shot
from erase.models import MINI_DIR, MINI_PIPELINE_DIR

ATTRIBUTES = ("shape", "colour", "style")
GATES = {"clip": {"shape": 0.95, "colour": 0.95, "style": 0.95},
         "pipeline": {"shape": 0.85, "colour": 0.85, "style": 0.80},
         "held-out": {"shape": 0.70, "colour": 0.70, "style": 0.70}}


def accuracy(truth: list[world.Attributes], seen: list[world.Attributes]) -> dict[str, float]:
    return {a: float(np.mean([getattr(t, a) == getattr(s, a) for t, s in zip(truth, seen)])) for a in ATTRIBUTES}


def prompts_for(held_out: bool, n: int, seed: int) -> tuple[list[str], list[world.Attributes]]:
    """n full captions (random wording) of combinations of one split, concept values only (no anchors)."""
    rng = np.random.default_rng(seed)
    pool = [a for a in world.combinations(held_out) if a.colour in world.COLOURS]
    attrs = [pool[i] for i in rng.integers(0, len(pool), size=n)]
    return [world.caption(a, rng, p_unsaid=0.0) for a in attrs], attrs


def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 32) -> list[Image.Image]:
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(prompts[i:i + batch]))]
        images += pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    return images


def run_gates(args) -> dict[str, dict[str, float]]:
    from diffusers import DiffusionPipeline

    clip = load_mini_clip(path=args.clip)
    arrays, truth = world.dataset(args.n, seed=10_000)
    held, held_truth = world.dataset(args.n // 3, seed=10_001, held_out=True)
    images = [Image.fromarray(x) for x in np.concatenate([arrays, held])]
    results = {"clip": accuracy(truth + held_truth, zero_shot(*clip, images))}
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    for name, held_out, seed in (("pipeline", False, 20_000), ("held-out", True, 30_000)):
        prompts, attrs = prompts_for(held_out, args.n, seed)
        generated = generate(pipe, prompts, seed, args.steps, args.guidance)
        results[name] = accuracy(attrs, zero_shot(*clip, generated))
        if args.grid:
            save_grid(generated, Path(args.grid) / f"{name}.png")
    return results


def save_grid(images: list[Image.Image], path: Path, columns: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = images[0].width
    grid = Image.new("RGB", (columns * size, -(-len(images) // columns) * size), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * size, (i // columns) * size))
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(path)


def report(results: dict, args, seconds: float) -> str:
    rows = ["| gate | shape | colour | style | threshold | pass |", "|---|---|---|---|---|---|"]
    for name, acc in results.items():
        ok = all(acc[a] >= GATES[name][a] for a in ATTRIBUTES)
        limits = "/".join(f"{GATES[name][a]:.0%}" for a in ATTRIBUTES)
        rows.append(f"| {name} | {acc['shape']:.1%} | {acc['colour']:.1%} | {acc['style']:.1%} | {limits} | "
                    f"{'yes' if ok else 'NO'} |")
    training = MINI_DIR / "training.json"
    record = json.loads(training.read_text()) if training.is_file() else {}
    lines = [f"- `{r['command']}`: seed {r['seed']}, {r['seconds'] / 60:.1f} min" for r in record.values()]
    header = (f"Judged by the mini CLIP's zero-shot classification; {args.n} images per gate (CLIP: {args.n} + "
              f"{args.n // 3} held-out-combination images), pipeline at {args.steps} steps, guidance "
              f"{args.guidance}, 32x32 images; held-out = (shape, colour) and (shape, artist) pairs never seen in "
              "training.")
    size = sum(f.stat().st_size for f in MINI_DIR.rglob("*") if f.is_file()) / 1e6
    footer = (f"Shipped size of erase/assets/mini: {size:.1f} MB. Gates took {seconds:.0f} s: "
              "`HF_HUB_OFFLINE=1 python scripts/mini_gates.py`.")
    training_header = ("Training (2 shared CPU cores, 1 thread per process; the CLIP beside the VAE, then the UNet on the "
                       "CLIP's frozen text tower: about 82 min of wall time):")
    return "\n".join([header, "", *rows, "", *([args.note, ""] if args.note else []),
                      training_header, "", *lines, "", footer])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=MINI_PIPELINE_DIR)
    parser.add_argument("--clip", type=Path, default=CLIP_DIR)
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--grid", help="folder for PNG grids of the generated images")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    parser.add_argument("--note", default="", help="free text recorded under the table (what was tried, ...)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    start = time.time()
    results = run_gates(args)
    body = report(results, args, time.time() - start)
    print(body)
    if not args.no_record:
        from benchmarks_md import update_section

        update_section("Miniature world", body)


if __name__ == "__main__":
    main()
