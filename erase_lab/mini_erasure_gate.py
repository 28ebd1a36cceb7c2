"""The miniature world's erasure gates for FIA, recorded in BENCHMARKS.md ("Miniature world: erasure gates").

    HF_HUB_OFFLINE=1 python -m erase_lab.mini_erasure_gate [--pipeline DIR] [--method fia] [--prompts 4]
        [--object-config fia-object] [--no-record --seeds 2]
    python -m erase_lab.mini_erasure_gate --table      # rewrite the section from the rows kept, measuring nothing
    HF_HUB_OFFLINE=1 python -m erase_lab.mini_erasure_gate --pipeline mini-dit   # the miniature SD3's gates

With one setting per kind (erase/configs/fia-object-mini.yaml for objects, which says why the mini model has its own
preset; the defaults for the README's mixed command), judged by erase.evaluate with the mini CLIP on held-out
prompts and paired seeds:
  - each Imagenette class alone: forgetting <= 10%, the other objects keep >= 85% of their accuracy;
  - the 10 Imagenette classes at once: forgetting <= 10%, the other objects' accuracy >= 80%;
  - `--concepts "van gogh,nudity"`: forgetting <= 10% for both, the other artists and the persons keep >= 85%;
  - paired image similarity on the neutral prompts >= 0.9 in all of these.
`--method conceptprune` (or any other) runs the same rows for comparison; the gates are FIA's. Rows land in
docs/erasure-gate-mini.json (the miniature SD3's: docs/erasure-gate-mini-dit.json, section "Miniature SD3 world:
erasure gates") one at a time; a rerun measures only the rows not there yet (`--again`: all of them).
`--object-config` measures the object rows with another preset (fia-object: the paper's, with its 3% for hard-to-
forget objects); they are kept beside the gate's rows for comparison.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from erase.evaluation import generate
from erase.families import denoiser_of

from .benchmarks_md import ROOT, WORLDS, World
from .mini_gates import MINI_GUIDANCE

KEY = ("method", "label", "settings", "seeds")  # what identifies a row in the store
FORGET_MAX, KEPT_MIN, SIMILARITY_MIN = 0.10, 0.85, 0.90
GATE_OBJECT_CONFIG = "fia-object-mini"
SEEDS = tuple(range(8))  # the table's: 32 images per concept; --seeds N (with --no-record) measures other counts
BOOTSTRAP = 1000  # resamplings of each interval (seed 0), as erase.evaluate's


def evaluate(pipe, catalog, concepts, retain, method, settings, prompts, seeds):
    import erase

    started = time.perf_counter()
    result = erase.erase(pipe, concepts, method=method, catalog=catalog, progress=False, **settings)
    seconds = time.perf_counter() - started
    report = erase.evaluate(pipe, result, retain=retain, catalog=catalog, progress=False,
                            prompts_per_concept=prompts, seeds=list(seeds), guidance_scale=MINI_GUIDANCE)
    return result, report, seconds


def ground_truth(pipe, result, prompts: int, seeds, neurons: dict) -> dict:
    """Forgetting with the erased concepts' own neurons (neurons.json) zeroed instead of the method's edit, by the
    same evaluation: the best any masking of the world's ground truth can do under this judge; and how much of
    those neurons' weights the method's mask holds (`found`)."""
    from dataclasses import replace

    import erase

    from .mini_gates import neurons_edit

    edit = neurons_edit(denoiser_of(pipe), neurons, *(concept.text for concept in result.concepts))
    report = erase.evaluate(pipe, replace(result, edit=edit), retain=[], progress=False,
                            prompts_per_concept=prompts, seeds=list(seeds), guidance_scale=MINI_GUIDANCE)
    truth = np.concatenate([after for _, after in judged(report, "forget").values()])
    return {"truth": float(truth.mean()), "truth_ci": interval(truth), "found": found(result.edit, edit)}


def judged(report, role: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per concept of `role`: whether the judge reads each image as the concept, on the original model and on the
    erased one (paired: the same prompt and seed at the same index)."""
    import erase
    from erase.concepts import parse_concepts

    catalog = erase.load_catalog("mini")
    records = [r for r in report.records if r["role"] == role]
    out = {}
    for concept in dict.fromkeys(r["concept"] for r in records):
        named = catalog.alternatives(parse_concepts([concept], catalog)[0])[0]
        mine = [r for r in records if r["concept"] == concept]
        out[concept] = (np.array([r["original_class"] == named for r in mine]),
                        np.array([r["erased_class"] == named for r in mine]))
    return out


def interval(hits: np.ndarray) -> list[float]:
    """95% bootstrap interval of a share of images (erase.evaluate's: percentile, 1000 resamplings, seed 0)."""
    from erase.evaluation.stats import Bootstrap

    return Bootstrap(BOOTSTRAP, 0).mean(hits).interval(0.95)


def ratio_interval(before: np.ndarray, after: np.ndarray) -> list[float]:
    """95% paired bootstrap interval of after's share over before's (others kept)."""
    draws = np.random.default_rng(0).integers(0, len(before), size=(BOOTSTRAP, len(before)))
    ratios = after[draws].mean(1) / np.maximum(before[draws].mean(1), 1e-9)
    return [float(v) for v in np.percentile(ratios, [2.5, 97.5])]


def found(method_edit, truth_edit) -> float:
    """The share of the erased concepts' own weights (their neurons' ff.net.2 columns) that the method's mask holds:
    whether it finds where the world stored them."""
    own = sum(int(mask.sum()) for mask in truth_edit.masks.values())
    return sum(int((mask & method_edit.masks[name]).sum()) for name, mask in truth_edit.masks.items()) / own


def still_named(report, catalog) -> dict[str, dict[str, str]]:
    """Per erased concept and forget prompt: how many of its erased images the judge still names the concept."""
    from erase.concepts import parse_concepts

    out = {}
    for name in report.metrics["forget"]:
        named = catalog.alternatives(parse_concepts([name], catalog)[0])[0]
        images = [r for r in report.records if r["role"] == "forget" and r["concept"] == name]
        out[name] = {p: f"{sum(r['erased_class'] == named for r in images if r['prompt'] == p)}/"
                        f"{sum(r['prompt'] == p for r in images)}" for p in dict.fromkeys(r["prompt"] for r in images)}
    return out


def kept(report) -> float:
    """Retained concepts' accuracy after erasure over before (pooled)."""
    retain = report.metrics["retain"].values()
    return float(np.mean([v["erased"] for v in retain]) / max(1e-9, np.mean([v["original"] for v in retain])))


def persons_kept(pipe, edit, judge) -> float:
    """Who the clothed-person prompts show (man, woman, couple, ...) after erasure over before."""
    from erase.mini import world
    from erase.mini.clip import zero_shot

    prompts = [f"a photo of a {q}" for q in world.PERSONS for _ in range(4)]

    def accuracy():
        images = generate(pipe, prompts, list(range(len(prompts))), 25, MINI_GUIDANCE, batch_size=len(prompts))
        seen = zero_shot(*judge, images, attributes=("person",))
        return np.mean([s["person"] == p.split()[-1] for s, p in zip(seen, prompts)])

    before = accuracy()
    with edit.applied_to(denoiser_of(pipe)):
        after = accuracy()
    return float(after / max(before, 1e-9))



def labels() -> list[str]:
    """The rows of one method, in the order they are measured and shown."""
    from erase.mini import world

    return ["van gogh, nudity", "the 10 Imagenette classes", *world.TAUGHT_OBJECTS]


def rows(pipe, catalog, method: str, prompts: int, landed, neurons: dict, measure, grids: Path | None = None,
         object_config: str = GATE_OBJECT_CONFIG, seeds=SEEDS) -> None:
    """Hand each row to `landed(row)` as it is measured: a long run records what it has. neurons: the pipeline's
    neurons.json (ground truth); `measure(label, settings)`: whether to measure that row; grids: a folder for each row's
    original | erased grid of its forget images."""
    from erase.mini import world
    from erase.mini.clip import load_mini_clip

    judge = load_mini_clip()
    # The shipped settings (FIA's default fill, noise); rows measured when it was zeros say so in their settings.
    object_settings = {"config": object_config} if method == "fia" else {}

    def row(label, concepts, retain, settings, extra=None):
        recorded = settings or "defaults"  # how the row's settings are stored and shown
        if not measure(label, recorded):
            return
        result, report, seconds = evaluate(pipe, catalog, concepts, retain, method, settings, prompts, seeds)
        if grids:
            grids.mkdir(parents=True, exist_ok=True)
            report.grid().save(grids / f"{method}-{label.replace(' ', '-').replace(',', '')}.png")
        forget = [v["erased"] for v in report.metrics["forget"].values()]
        forgot, others = judged(report, "forget"), judged(report, "retain")
        worst_name = max(forgot, key=lambda c: forgot[c][1].mean())
        pooled = lambda groups, side: np.concatenate([g[side] for g in groups.values()])
        r = {"label": label, "settings": recorded, "seeds": list(seeds), "edited": result.record["totals"]["edited"],
             "forget_before_ci": interval(pooled(forgot, 0)), "forget_ci": interval(pooled(forgot, 1)),
             "forget_max_ci": interval(forgot[worst_name][1]), "retain_ci": interval(pooled(others, 1)),
             "kept_ci": ratio_interval(pooled(others, 0), pooled(others, 1)),
             "forget_before": float(np.mean([v["original"] for v in report.metrics["forget"].values()])),
             "forget": float(np.mean(forget)), "forget_max": float(max(forget)), "kept": kept(report),
             "forget_each": {c: v["erased"] for c, v in report.metrics["forget"].items()},
             "still_named": still_named(report, catalog),
             "retain": float(np.mean([v["erased"] for v in report.metrics["retain"].values()])),
             "similarity": report.metrics["fidelity"]["paired_similarity_neutral"], "seconds": seconds,
             "threads": torch.get_num_threads()}
        r.update(extra(result) if extra else {})
        print(r, flush=True)
        landed({"method": method, **r})

    # The README's command and the ten classes first: a run stopped early has the rows users read first.
    row("van gogh, nudity", ["van gogh", "nudity"], [a for a in world.ARTISTS if a != "van gogh"], {},
        extra=lambda result: {"persons_kept": persons_kept(pipe, result.edit, judge),
                              **ground_truth(pipe, result, prompts, seeds, neurons)})
    row("the 10 Imagenette classes", list(world.TAUGHT_OBJECTS), list(world.BASE_OBJECTS), object_settings,
        extra=lambda result: ground_truth(pipe, result, prompts, seeds, neurons))
    for concept in world.TAUGHT_OBJECTS:
        row(concept, [concept], [o for o in world.OBJECTS if o != concept], object_settings,
            extra=lambda result: ground_truth(pipe, result, prompts, seeds, neurons))


def primary(r: dict) -> bool:
    """Whether a row ran with the table's settings, not another object preset measured for comparison."""
    return r["settings"] in ("defaults", {"config": GATE_OBJECT_CONFIG})


def gate_row(r: dict) -> bool:
    return r["method"] == "fia" and primary(r)


def verdict(r: dict) -> bool:
    kept_ok = r["retain"] >= 0.80 if r["label"] == "the 10 Imagenette classes" else r["kept"] >= KEPT_MIN
    return (r["forget_max"] <= FORGET_MAX and kept_ok and r.get("persons_kept", 1.0) >= KEPT_MIN
            and r["similarity"] >= SIMILARITY_MIN)


def threads(r: dict) -> str:
    """', 1 thread' where a row's erasure ran on other than the table's 2 threads."""
    n = r.get("threads", 2)
    return "" if n == 2 else f", {n} thread{'s' * (n > 1)}"


def share(r: dict, key: str) -> str:
    """A share as a percentage and its interval where the row has one; – where the row has none (ground truth and
    persons are measured on some rows only)."""
    if key not in r:
        return "–"
    low_high = r.get(f"{key}_ci")
    return f"{r[key]:.0%}" + (f" [{low_high[0]:.0%}, {low_high[1]:.0%}]" if low_high else "")


def worst(r: dict) -> str:
    """', church': the concept forgotten least, where several were erased and one was not fully forgotten."""
    each = r.get("forget_each", {})
    return f", {max(each, key=each.get)}" if len(each) > 1 and r["forget_max"] > 0 else ""


def seed_words(seeds) -> str:
    """'seeds 0 and 1', 'seeds 0–7': the seeds a table's rows were sampled from."""
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"seeds {seeds[0]} and {seeds[1]}" if len(seeds) == 2 else f"seeds {seeds[0]}–{seeds[-1]}"


def table(store, prompts: int, seeds=SEEDS, model: str | None = None, world: World = WORLDS["mini"]) -> str:
    """The section: the rows of every method (gate rows first), which prompts the judge still names, the protocol.
    model: the model's name where it is not the world's shipped one."""
    from erase.profile import EMBEDDED

    from .benchmarks_md import model_sentence, section_body

    assets = EMBEDDED[world.name].parent.relative_to(ROOT)
    store_name, reproduce_command = world.named("erasure-gate", "json"), world.command("mini_erasure_gate")

    results, measured = {}, [r for r in store.rows if r["seeds"] == list(seeds)]
    for r in sorted(measured, key=lambda r: (not primary(r), labels().index(r["label"]))):
        results.setdefault(r["method"], []).append(r)
    done, total = sum(map(primary, measured)), len(labels()) * len(results)
    partial = [f"_Partial: {done} of {total} rows measured so far; the module records each row as it lands._"]
    lines = [("| method | erased | settings | weights edited | forgetting before → after (worst) | others kept | "
              "its own neurons zeroed instead | its own weights in the mask | others' accuracy | persons kept | "
              "paired similarity (neutral) | time | gate |"), "|---" * 13 + "|"]
    for method, rs in results.items():
        for r in rs:
            gate = ("yes" if verdict(r) else "NO") if gate_row(r) else "–"
            lines.append(f"| {method}{store.mark(r)} | {r['label']} | {r['settings']} | {r['edited']} | "
                         f"{share(r, 'forget_before')} → {share(r, 'forget')} ({share(r, 'forget_max')}{worst(r)}) | "
                         f"{share(r, 'kept')} | {share(r, 'truth')} | {share(r, 'found')} | {share(r, 'retain')} | "
                         f"{share(r, 'persons_kept')} | {r['similarity']:.3f} | {r['seconds']:.0f} s{threads(r)} | {gate} |")
    images = prompts * len(seeds)
    protocol = (f"{model_sentence(model, world.name)} Gates (FIA): forgetting ≤ {FORGET_MAX:.0%} for every erased "
                f"concept; the other objects keep ≥ {KEPT_MIN:.0%} of their accuracy (one class) or stay ≥ 80% accurate (ten "
                f"classes); the other artists and the persons keep ≥ {KEPT_MIN:.0%}; paired CLIP image similarity on "
                f"the catalog's neutral prompts ≥ {SIMILARITY_MIN}. Evaluation: erase.evaluate, mini CLIP judge, "
                f"{prompts} held-out prompts per concept × {seed_words(seeds)} ({images} images per concept, so one "
                f"image is {1 / images:.1%}), {world.sampler} 25 steps, guidance {MINI_GUIDANCE:g}; brackets: 95% bootstrap "
                f"intervals over the images ({BOOTSTRAP} resamplings, seed 0; others kept: paired, of the ratio). "
                "Forgetting: the "
                "share of the erased concepts' images the judge reads as the concept, before and after the erasure, "
                "and in brackets that of the concept forgotten least; 'others' = every other object (one class), the "
                "15 everyday objects (ten classes), the other artists (van gogh, nudity); others kept: their accuracy "
                "after over before; others' accuracy: after; persons: 'a photo of a {person}' classified among the "
                "world's persons, 4 seeds each. 'Its own neurons zeroed instead': forgetting when the concept's "
                f"ground-truth neurons ({assets}/neurons.json) are zeroed in place of the method's edit, same "
                "prompts and seeds; 'its own weights in the mask': the share of those neurons' ff.net.2 weights the "
                "method's mask holds. Time is the erasure alone (2 threads unless the row says otherwise). FIA rows "
                "with – as their gate ran with another object preset (`--object-config`), for comparison; the list "
                "under the table names the prompts whose erased images the judge still reads as the concept.")
    reproduce = (f"`{reproduce_command}{'' if seeds == SEEDS else f' --seeds {len(seeds)} --no-record'}` measures the "
                 f"rows not yet in {store_name} (`--object-config fia-object`: the comparison rows; `--method "
                 "conceptprune`: the same rows for another method; `--seeds 2 --no-record`: the same rows on 8 images "
                 "per concept, printed, for a quick look; `--table`: only rewrite this section from the rows kept).")
    status = [*(partial if done < total and store.path else []), *store.stale_note(reproduce_command)]
    return section_body(["\n".join(lines), *named_block([r for rs in results.values() for r in rs])], protocol,
                        reproduce, status)


def named_block(rows: list[dict]) -> list[str]:
    """Which prompts' erased images the judge still names the concept, for the rows that recorded it (compare the
    floor in "Miniature world: the judge on bare places and clothed persons")."""
    lines = [f"- {r['method']}, {r['label']}" + ("" if primary(r) else f" ({r['settings']['config']})") + ": " + "; ".join(
        f"{concept}: " * (len(r["still_named"]) > 1) + ", ".join(f"{prompt} {n}" for prompt, n in prompts.items() if not n.startswith("0/"))
        for concept, prompts in r["still_named"].items() if r["forget_each"][concept] > 0)
        for r in rows if r.get("still_named") and r["forget_max"] > 0]
    summary = "<details><summary>erased images the judge still names the concept, by prompt</summary>"
    return ["\n".join([summary, "", *lines, "", "</details>"])] if lines else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="mini", help="mini, mini-dit (the miniature SD3), or a trial folder of "
                        "either")
    parser.add_argument("--method", action="append", help="repeatable; default fia")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=len(SEEDS),
                        help="seeds 0..N-1 per prompt; other than the table's only with --no-record")
    parser.add_argument("--object-config", default=GATE_OBJECT_CONFIG,
                        help="FIA preset of the object rows; another than the gate's is measured for comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", action="append", metavar="LABEL",
                        help="measure only this row (repeatable), e.g. --only church --only 'van gogh, nudity'")
    parser.add_argument("--again", action="store_true", help="measure rows already recorded again")
    parser.add_argument("--grid", type=Path, metavar="DIR", help="save each measured row's forget images (original | "
                        "erased) as DIR/METHOD-LABEL.png")
    parser.add_argument("--no-record", action="store_true", help="print only; leave the rows and BENCHMARKS.md alone")
    parser.add_argument("--table", action="store_true", help="only rewrite the section from its rows; measure nothing")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: expected at least 1")
    if args.seeds != len(SEEDS) and not args.no_record:
        parser.error(f"--seeds {args.seeds}: the table's rows use seeds {SEEDS}; measure other seeds with --no-record")
    if unknown := set(args.only or ()) - set(labels()):
        raise SystemExit(f"--only: no row {sorted(unknown)}; the rows are {labels()}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .benchmarks_md import RowStore, mini_model, update_section

    if args.table:
        world = WORLDS.get(args.pipeline) or parser.error(f"--table: --pipeline takes {' or '.join(WORLDS)}")
        rows_kept = RowStore(world.rows("erasure-gate"), KEY, mini_model(world.name), MINI_GUIDANCE)
        return update_section(world.section("erasure-gate"), table(rows_kept, args.prompts, world=world))
    torch.set_num_threads(args.threads)
    import erase
    from erase.edits import fingerprint

    from .benchmarks_md import world_of
    from .mini_gates import taught_neurons

    pipe, catalog = erase.load_pipeline(args.pipeline), erase.load_catalog("mini")
    world = world_of(pipe)  # a trial model's rows and section are its world's
    section = world.section("erasure-gate")
    neurons = taught_neurons(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    # A print-only run keeps its rows in memory: its table is what it measured, at the seeds it used.
    store = RowStore(None if args.no_record else world.rows("erasure-gate"), KEY, fingerprint(denoiser_of(pipe)),
                     MINI_GUIDANCE)
    seeds = tuple(range(args.seeds))
    model = None if args.pipeline == world.name else args.pipeline

    def landed(row: dict) -> None:
        store.put(row)
        if not args.no_record:
            update_section(section, table(store, args.prompts, seeds, model, world))

    for method in args.method or ["fia"]:
        def measure(label: str, settings) -> bool:
            wanted = not args.only or label in args.only
            return wanted and (args.again or not store.has(method=method, label=label, settings=settings,
                                                           seeds=list(seeds)))

        rows(pipe, catalog, method, args.prompts, landed, neurons, measure, args.grid, args.object_config, seeds)
    if not args.no_record:  # also when every row was there already: the section follows this module's layout
        update_section(section, table(store, args.prompts, seeds, model, world))
    print(table(store, args.prompts, seeds, model, world))

if __name__ == "__main__":
    main()
