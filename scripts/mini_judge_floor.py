"""How the mini judge reads the held-out places with nothing on them: the forgetting a perfect erasure still scores.

    HF_HUB_OFFLINE=1 python scripts/mini_judge_floor.py [--clip DIR] [--renders 32] [--seeds 8] [--no-record] [--note TEXT]

An object erased from "a photo of a golf ball at the snow" at best leaves the bare snow. The evaluator classifies
that image among the object kind's class texts and the concept's anchor (catalog.alternatives), as it does every
forget image; if the judge names the erased object there, forgetting cannot reach 0 whatever the method does. For
each taught object and each of the object kind's held-out places (the places of its evaluation prompts), this
renders the world's ground truth (no diffusion): the object on the place, and the bare place; both go through the
evaluator's judge and classes. Floor = the mean over the places of the share of bare renders read as the object:
the forgetting of an erasure that leaves exactly the bare place, with one evaluation prompt per place (the gates'
4 prompts). Writes BENCHMARKS.md "Miniature world: the judge on bare places".
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from erase.evaluation import MINI_GUIDANCE

sys.path.insert(0, str(Path(__file__).parent))
SECTION = "Miniature world: the judge on bare places"


def read_as(judge, catalog, concept, scenes: list, seed: int) -> float:
    """Share of the scenes' renders that the judge classifies as the concept among its alternatives."""
    from erase.mini import world

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(world.render(scene, rng)) for scene in scenes]
    return float(np.mean(np.equal(judge.classify(judge.image_features(images), catalog.alternatives(concept)), 0)))


def pipeline_places(places: list[str], seeds: int) -> dict[str, torch.Tensor]:
    """The judge's features of the mini pipeline's own images of each bare place ("a photo of the snow")."""
    import erase

    pipe = erase.load_pipeline("mini")
    pipe.set_progress_bar_config(disable=True)
    return {p: pipe([f"a photo of the {p}"] * seeds, num_inference_steps=25, guidance_scale=MINI_GUIDANCE,
                    generator=[torch.Generator().manual_seed(s) for s in range(seeds)]).images for p in places}


def measure(judge, renders: int, seeds: int) -> tuple[list[str], list[dict]]:
    from erase.concepts import load_catalog, parse_concepts
    from erase.mini import world

    catalog = load_catalog("mini")
    places = list(catalog.kinds["object"].eval_fillers)
    generated = {p: judge.image_features(images) for p, images in pipeline_places(places, seeds).items()}
    rows = []
    for k, name in enumerate(world.TAUGHT_OBJECTS):
        concept = parse_concepts([name], catalog)[0]
        classes = catalog.alternatives(concept)
        drawn = {p: read_as(judge, catalog, concept, [world.Scene(object=name, place=p)] * renders, 100 * k + j)
                 for j, p in enumerate(places)}
        bare = {p: read_as(judge, catalog, concept, [world.Scene(place=p)] * renders, 10_000 + j)
                for j, p in enumerate(places)}
        piped = {p: float(np.mean(np.equal(judge.classify(f, classes), 0))) for p, f in generated.items()}
        rows.append({"object": name, "drawn": drawn, "bare": bare, "piped": piped,
                     "floor": float(np.mean(list(bare.values()))), "floor_piped": float(np.mean(list(piped.values())))})
    return places, rows


def table(places: list[str], rows: list[dict], clip: str, renders: int, seeds: int, seconds: float) -> str:
    cells = " | ".join
    lines = [f"| taught object | read as itself, drawn on: {cells(places)} | bare place read as it: {cells(places)} "
             f"| floor | the pipeline's bare place read as it: {cells(places)} | floor (pipeline) |",
             "|---" * (3 + 3 * len(places)) + "|"]
    for r in rows:
        drawn, bare, piped = (cells(f"{r[side][p]:.0%}" for p in places) for side in ("drawn", "bare", "piped"))
        lines.append(f"| {r['object']} | {drawn} | {bare} | {r['floor']:.0%} | {piped} | {r['floor_piped']:.0%} |")
    lines += ["", f"Judge: {clip}; {renders} ground-truth renders per cell (world.render, no diffusion) and the mini "
              f"pipeline's own images of \"a photo of the {{place}}\" (seeds 0-{seeds - 1}, DPM-Solver++ 25 steps, "
              f"guidance {MINI_GUIDANCE:g}), classified by erase.evaluate's judge among the concept's alternatives "
              "(the object kind's class texts and its anchor). Floor: the forgetting accuracy of an erasure that "
              "leaves exactly the bare place (as the world draws it, or as the pipeline draws it), with one evaluation "
              f"prompt per place as in the erasure gates. {seconds:.0f} s: "
              "`HF_HUB_OFFLINE=1 python scripts/mini_judge_floor.py`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, help="a mini CLIP folder (default: the shipped judge)")
    parser.add_argument("--renders", type=int, default=32, help="ground-truth renders per cell")
    parser.add_argument("--seeds", type=int, default=8, help="pipeline images per bare place")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--note", help="a paragraph to keep under the table (what was tried, what it showed)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks_md import update_section

    from erase.evaluation.judge import Judge
    from erase.mini.clip import CLIP_DIR, load_mini_clip

    started = time.perf_counter()
    judge = Judge(*load_mini_clip(path=args.clip or CLIP_DIR), name="mini", pretrained=str(args.clip or "shipped"))
    with torch.no_grad():
        places, rows = measure(judge, args.renders, args.seeds)
    body = table(places, rows, "the shipped mini CLIP" if args.clip is None else str(args.clip), args.renders,
                 args.seeds, time.perf_counter() - started) + (f"\n\n{args.note}" if args.note else "")
    print(body)
    if not args.no_record:
        update_section(SECTION, body)


if __name__ == "__main__":
    main()
