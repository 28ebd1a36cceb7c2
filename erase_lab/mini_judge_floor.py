"""How the mini judge reads the held-out places with nothing on them: the forgetting a perfect erasure still scores.

    HF_HUB_OFFLINE=1 python -m erase_lab.mini_judge_floor [--clip DIR] [--pipeline DIR] [--renders 32] [--seeds 8]
        [--no-record]

An object erased from "a photo of a golf ball at the snow" at best leaves the bare snow. The evaluator classifies
that image among the object kind's class texts and the concept's anchor (catalog.alternatives), as it does every
forget image; if the judge names the erased object there, forgetting cannot reach 0 whatever the method does. For
each taught object and each of the object kind's held-out places (the places of its evaluation prompts), this
renders the world's ground truth (no diffusion): the object on the place, and the bare place; both go through the
evaluator's judge and classes. Floor = the mean over the places of the share of bare renders read as the object:
the forgetting of an erasure that leaves exactly the bare place, with one evaluation prompt per place (the gates'
4 prompts).

Nudity erased at best leaves the clothed person. For each of nudity's evaluation prompts (the gates' 4), the same
prompt without "naked" ("an artistic photo of an athlete") is drawn by the pipeline, and the world's clothed person
of that prompt is rendered; the share of each the judge reads as naked (among nudity's alternatives) is the floor
of an erasure that leaves exactly the clothed person.

Neither is what an erasure of the taught model leaves at best: without the concept the model still draws the rest of
the concept's own prompt, not the bare place's prompt. So each taught concept's gate prompts are also drawn with
every taught neuron zeroed (the ground truth of a model that never learnt one) and read as in the gates: the floor
(ground truth), the forgetting of an erasure that removes exactly what was taught. Writes BENCHMARKS.md "Miniature
world: the judge on bare places and clothed persons".
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from erase.evaluation import EvalSettings, generate
from erase.models import image_side

from .mini_erasure_gate import SEEDS as GATE_SEEDS
from .mini_erasure_gate import seed_words
from .mini_gates import MINI_GUIDANCE, neurons_edit, taught_neurons

SECTION = "Miniature world: the judge on bare places and clothed persons"


def read_as(judge, catalog, concept, scenes: list, seed: int) -> float:
    """Share of the scenes' renders that the judge classifies as the concept among its alternatives."""
    from erase.mini import world

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(world.render(scene, rng)) for scene in scenes]
    return float(np.mean(np.equal(judge.classify(judge.image_features(images), catalog.alternatives(concept)), 0)))


def without(prompt: str, word: str) -> str:
    """The prompt with a word taken out and its article mended: 'a photo of a naked athlete' -> 'a photo of an athlete'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", " ".join(w for w in prompt.split() if w != word))


def ground_truth_reads(pipe, judge, catalog, concept, seeds: int, untaught) -> dict[str, np.ndarray]:
    """Per gate prompt of the concept (the erasure gates' 4): whether the judge reads each seed's image as the
    concept (among its alternatives), drawn as erase.evaluate draws it but under `untaught` (the edit that zeroes
    every taught neuron)."""
    drawn = EvalSettings()  # the evaluator's steps and batches; its mini guidance below
    prompts = catalog.eval_prompts(concept, limit=4)
    jobs = [(prompt, seed) for prompt in prompts for seed in range(seeds)]
    with untaught.applied_to(pipe.unet):
        images = generate(pipe, [p for p, _ in jobs], [s for _, s in jobs], drawn.steps, MINI_GUIDANCE,
                                 image_side(pipe, drawn.resolution), drawn.batch_size)
    named = np.equal(judge.classify(judge.image_features(images), catalog.alternatives(concept)), 0)
    return {prompt: named[i * seeds:(i + 1) * seeds] for i, prompt in enumerate(prompts)}


def floors(reads: dict[str, np.ndarray]) -> dict:
    """The ground-truth floor over every seed and at the erasure gates' seeds, and the prompts read as the concept."""
    every = np.concatenate(list(reads.values()))
    at_gates = np.concatenate([r[list(GATE_SEEDS)] for r in reads.values()])
    return {"floor_truth": float(every.mean()), "floor_truth_gates": float(at_gates.mean()),
            "named": {p: f"{int(r.sum())}/{len(r)}" for p, r in reads.items() if r.any()}}


def measure(judge, pipeline: str, renders: int, seeds: int) -> tuple[list[str], list[dict], list[dict], dict]:
    """(the object kind's held-out places, a row per taught object, a row per nudity evaluation prompt, nudity's
    ground-truth floors)."""
    import erase
    from erase.concepts import load_catalog, parse_concepts
    from erase.mini import world

    catalog = load_catalog("mini")
    pipe = erase.load_pipeline(pipeline)
    pipe.set_progress_bar_config(disable=True)
    untaught = neurons_edit(pipe.unet, taught_neurons(pipeline), *world.TAUGHT)
    places = list(catalog.kinds["object"].eval_fillers)
    generated = {p: judge.image_features(generate(pipe, [f"a photo of the {p}"] * seeds, list(range(seeds)), 25, MINI_GUIDANCE,
                                                        batch_size=50))
                 for p in places}
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
                     "floor": float(np.mean(list(bare.values()))), "floor_piped": float(np.mean(list(piped.values()))),
                     **floors(ground_truth_reads(pipe, judge, catalog, concept, seeds, untaught))})
    nudity = parse_concepts(["nudity"], catalog)[0]
    return places, rows, clothed_rows(pipe, judge, catalog, renders, seeds), floors(
        ground_truth_reads(pipe, judge, catalog, nudity, seeds, untaught))


def clothed_rows(pipe, judge, catalog, renders: int, seeds: int) -> list[dict]:
    """Per nudity evaluation prompt (the gates' 4): the prompt without "naked", its clothed person as the world
    renders it and as the pipeline draws it, and the share of each the judge reads as naked."""
    from erase.concepts import parse_concepts
    from erase.mini import world

    concept = parse_concepts(["nudity"], catalog)[0]
    classes = catalog.alternatives(concept)
    rows = []
    for k, prompt in enumerate(catalog.eval_prompts(concept, limit=4)):
        clothed = without(prompt, concept.text)
        person = next(q for q in world.PERSONS if q in clothed.split())
        place = next((p for p in world.PLACES if p in clothed.split()), None)
        rendered = read_as(judge, catalog, concept, [world.Scene(person=person, place=place)] * renders, 20_000 + k)
        images = generate(pipe, [clothed] * seeds, list(range(seeds)), 25, MINI_GUIDANCE, batch_size=50)
        naked = np.equal(judge.classify(judge.image_features(images), classes), 0)
        rows.append({"prompt": prompt, "clothed": clothed, "rendered": rendered, "piped": float(np.mean(naked)),
                     "piped_gates": float(np.mean(naked[list(GATE_SEEDS)]))})
    return rows


def table(places: list[str], rows: list[dict], clothed: list[dict], nudity: dict, model: str | None, clip: str,
          renders: int, seeds: int, seconds: float) -> str:
    """The section. model: the pipeline's name where it is not the shipped one."""
    from .benchmarks_md import section_body

    cells = " | ".join
    lines = [(f"| taught object | read as itself, drawn on: {cells(places)} | bare place read as it: {cells(places)} "
              f"| floor | the pipeline's bare place read as it: {cells(places)} | floor (pipeline) "
              "| floor (ground truth) | at the gates' seeds |"),
             "|---" * (5 + 3 * len(places)) + "|"]
    for r in rows:
        drawn, bare, piped = (cells(f"{r[side][p]:.0%}" for p in places) for side in ("drawn", "bare", "piped"))
        lines.append(f"| {r['object']} | {drawn} | {bare} | {r['floor']:.0%} | {piped} | {r['floor_piped']:.0%} "
                     f"| {r['floor_truth']:.0%} | {r['floor_truth_gates']:.0%} |")
    named = [f"- {r['object']}: " + ", ".join(f"{p} {n}" for p, n in r["named"].items()) for r in rows if r["named"]]
    if nudity["named"]:
        named.append("- nudity: " + ", ".join(f"{p} {n}" for p, n in nudity["named"].items()))
    summary = "<details><summary>gate prompts read as the concept with every taught neuron zeroed</summary>"
    clothed_lines = [("| nudity's evaluation prompt | without \"naked\" | the world's clothed person read as naked | "
                      "the pipeline's image of it read as naked |"), "|---|---|---|---|"]
    clothed_lines += [f"| {r['prompt']} | {r['clothed']} | {r['rendered']:.0%} | {r['piped']:.0%} |" for r in clothed]
    floors = {"pipeline": np.mean([r["piped"] for r in clothed]), "pipeline_gates": np.mean([r["piped_gates"] for r in clothed]),
              "truth": nudity["floor_truth"], "truth_gates": nudity["floor_truth_gates"]}
    blocks = ["\n".join(lines), *(["\n".join([summary, "", *named, "", "</details>"])] if named else []),
              "\n".join(clothed_lines)]
    return section_body(blocks, protocol(model, clip, renders, seeds, floors),
                        f"`HF_HUB_OFFLINE=1 python -m erase_lab.mini_judge_floor` ({seconds:.0f} s; `--pipeline DIR "
                        "--no-record` measures a trial model and prints its section).")


def protocol(model: str | None, clip: str, renders: int, seeds: int, nudity_floors: dict[str, float]) -> str:
    """How the floors were measured (model None: the shipped one), with nudity's floors, which have no table row."""
    from .benchmarks_md import model_sentence

    gate_seeds = seed_words(GATE_SEEDS)  # 'seeds 0 and 1'
    return (f"{model_sentence(model)} Judge: {clip}; {renders} ground-truth renders per cell (world.render, no "
            f"diffusion) and the mini pipeline's own images of \"a photo of the {{place}}\" (seeds 0-{seeds - 1}, "
            f"DPM-Solver++ 25 steps, guidance {MINI_GUIDANCE:g}), classified by erase.evaluate's judge among the "
            "concept's alternatives (the object kind's class texts and its anchor). Floor: the forgetting accuracy of "
            "an erasure that leaves exactly the bare place (as the world draws it, or as the pipeline draws it), with "
            "one evaluation prompt per place as in the erasure gates. Floor (ground truth): the object's own 4 gate "
            "prompts drawn by the model with every taught neuron zeroed (the neurons.json beside it: the model that "
            f"never learnt a taught concept), seeds 0-{seeds - 1} as erase.evaluate draws them, read as in the gates; "
            f"beside it the same at the gates' {gate_seeds} only (the images the erasure gates count). Nudity (second "
            "table): the same judge and renders; the pipeline draws each of its evaluation prompts without \"naked\" "
            f"at seeds 0-{seeds - 1} and the judge chooses among nudity's alternatives (\"a photo of a naked person\" "
            f"and its anchor). Its floor (pipeline): {nudity_floors['pipeline']:.0%}, the forgetting of an erasure that "
            f"leaves exactly the clothed person the pipeline draws; {nudity_floors['pipeline_gates']:.0%} at the "
            f"erasure gates' {gate_seeds}. Its floor (ground truth): {nudity_floors['truth']:.0%} "
            f"({nudity_floors['truth_gates']:.0%} at the gates' seeds), nudity's 4 gate prompts with every taught "
            "neuron zeroed, as for the objects.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, help="a mini CLIP folder (default: the shipped judge)")
    parser.add_argument("--pipeline", default="mini", help="the mini pipeline (or a trial folder of one, neurons.json "
                                                           "beside it)")
    parser.add_argument("--renders", type=int, default=32, help="ground-truth renders per cell")
    parser.add_argument("--seeds", type=int, default=8, help="pipeline images per bare place and per clothed prompt")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.seeds <= max(GATE_SEEDS):
        parser.error(f"--seeds {args.seeds}: at least {max(GATE_SEEDS) + 1}, to hold the erasure gates' seeds {GATE_SEEDS}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from erase.evaluation.judge import Judge
    from erase.mini.clip import CLIP_DIR, load_mini_clip

    from .benchmarks_md import update_section

    started = time.perf_counter()
    judge = Judge(*load_mini_clip(path=args.clip or CLIP_DIR), name="mini", pretrained=str(args.clip or "shipped"))
    with torch.no_grad():
        places, rows, clothed, nudity = measure(judge, args.pipeline, args.renders, args.seeds)
    model = None if args.pipeline == "mini" else args.pipeline
    body = table(places, rows, clothed, nudity, model, "the shipped mini CLIP" if args.clip is None else str(args.clip),
                 args.renders, args.seeds, time.perf_counter() - started)
    print(body)
    if not args.no_record:
        update_section(SECTION, body)


if __name__ == "__main__":
    main()
