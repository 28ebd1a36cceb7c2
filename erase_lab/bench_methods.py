"""Every registered method on the miniature world: forget sets of 1, 3 and 10 concepts that mix kinds, fixed seeds.

    HF_HUB_OFFLINE=1 python -m erase_lab.bench_methods            # the method table, the attacks and the plot (2 CPU
                                                                # cores; hours; --sizes 1 --methods fia: a part)
    HF_HUB_OFFLINE=1 python -m erase_lab.bench_methods --pipeline mini-dit   # the same on the miniature SD3
    HF_HUB_OFFLINE=1 python -m erase_lab.bench_methods scaling    # FIA wall time and peak memory, 1 to 100 concepts
    HF_HUB_OFFLINE=1 python -m erase_lab.bench_methods sweep      # FIA r2 x alpha on the 3-concept set
    HF_HUB_OFFLINE=1 python -m erase_lab.bench_methods lives      # each method on taught and on base concepts
    HF_HUB_OFFLINE=1 python -m erase_lab.bench_methods attack     # the same on forget sets 1 and 3 only
                                                                # (--sizes 1 --methods fia,uce --kinds inversion: a part)
    python -m erase_lab.bench_methods plot                        # redraw the plot from docs/methods-mini.json
    python -m erase_lab.bench_methods sweep --table               # rewrite a section (table, sweep, attack) from
                                                                # its rows, measuring nothing

Each run (method, forget set) is its own process, so its peak memory is its own; one erasure serves the methods
table's row and its attacks (forget sets 1 and 3). Sections of BENCHMARKS.md: "Miniature world: methods" (rows kept
in docs/methods-mini.json as they finish), "Miniature world: attacks" (rows in docs/attack-mini.json), "Miniature
world: where a concept lives" (docs/lives-mini.json), "Miniature world: FIA scaling", "Miniature world: FIA r2/alpha
sweep"; the plot is docs/methods-mini.png. `--pipeline mini-dit` measures the miniature SD3 (MMDiT) the same way:
rows in docs/*-mini-dit.json, sections "Miniature SD3 world: ...", and the plot of both worlds side by side
(docs/methods-worlds.png). A rerun measures only the rows not yet measured on the shipped mini model; a training
row that was stopped resumes from its checkpoint (in $TMPDIR/erase-bench-checkpoints). Needs the `bench` extra
(matplotlib) for the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .benchmarks_md import WORLDS, World
from .mini_erasure_gate import seed_words
from .mini_gates import MINI_GUIDANCE

ROOT = Path(__file__).resolve().parent.parent
FORGET_SETS = {1: ["church"], 3: ["church", "van gogh", "nudity"],
               10: ["church", "golf ball", "parachute", "tench", "garbage truck", "van gogh", "claude monet",
                    "pablo picasso", "andy warhol", "nudity"]}
METHODS = {  # method → its preset tuned on the mini world (erase_lab.tune_mini; presets in erase/configs/)
    "fia": {"config": "fia-mini", "fill": "zeros"},  # the masking methods as published (fills compared in bench_revival)
    "conceptprune": {"config": "conceptprune-mini", "fill": "zeros"},
    "uce": {"config": "uce-mini"},
    "esd": {"config": "esd-mini"},
    "salun": {"config": "salun-mini"},
    "dynamic": {"config": "dynamic-mini"},
}
# A light evaluation, to screen settings (the tuning grids, the r2/alpha sweep): 4 images a concept (2 held-out
# prompts × 2 seeds), at most 4 in-kind and 2 cross-kind retained concepts per kind.
LIGHT_EVAL = {"prompts_per_concept": 2, "seeds": [0, 1], "steps": 25, "guidance_scale": MINI_GUIDANCE, "max_retain": 4,
              "max_cross_retain": 2}
# The tables of record (methods, where it lives, attacks, the tuning's finalists): 32 images a concept, erased and
# retained (4 held-out prompts × seeds 0-7), the same retained concepts as LIGHT_EVAL.
EVAL = {**LIGHT_EVAL, "prompts_per_concept": 4, "seeds": list(range(8))}
UNTUNED_EVAL = "12 images a concept (seeds 0–2), at most 10 in-kind and 3 cross-kind retained concepts per kind"
ATTACK = {"prompts_per_concept": 4, "seeds": list(range(8)), "guidance_scale": MINI_GUIDANCE}  # EVAL's images, attacked
ATTACK_KINDS = ("prompt", "inversion", "revival")
# What a row records of its attack's settings: each kind's budget, and what every kind shares.
ATTACK_SETTINGS = ("steps", "tokens", "lr", "timesteps", "init", "locations", "rank", "iterations", "top_ratio", "seed",
                   "seeds", "sample_steps", "attack_s")
ATTACK_SIZES = (1, 3)  # forget sets the prompt attack runs on
# Concepts taught into known feed-forward neurons, and concepts the base model learnt end to end (no neurons of
# their own): the same method on each shows whether it needs the concept to live where it looks.
LIVES = {"taught": ["van gogh", "pablo picasso", "tench", "golf ball"], "base": ["rembrandt", "edvard munch", "dog", "car"]}
WORLD = WORLDS["mini"]  # what this process measures: --pipeline sets it (a run's jobs carry it to their processes)
BOTH_WORLDS = ROOT / "docs" / "methods-worlds.png"
TUNED_WHERE = {"mini": "", "mini-dit": " of the UNet world, not on this one, so that both worlds run the same settings"}
# The original model's images, shared by every run (evaluate() keys them by model, prompts and seeds): each method's
# evaluation then generates only its erased side. Its training data stays cold (a fresh cache per run), as timed.
ORIGINALS = Path(tempfile.gettempdir()) / "erase-bench-originals"
# A training run's checkpoints, one folder per row: a stopped row (Ctrl-C, a machine shut down) resumes where it stopped.
CHECKPOINTS = Path(tempfile.gettempdir()) / "erase-bench-checkpoints"


def one(method: str, concepts: list[str], settings: dict, evaluation: dict | None, attacks: list[str] = (),
        truth: bool = False) -> dict:
    """Erase (and evaluate with `evaluation`'s settings unless None, attack with each kind in `attacks`, and measure
    the ground truth's forgetting where `truth`) in this process; one row's numbers, each attack's under "attacks"."""
    from dataclasses import fields

    import torch

    import erase
    from erase.methods import get_method

    torch.set_num_threads(1)  # two runs share the 2 cores
    pipe = erase.load_pipeline(WORLD.name)
    run = dict(settings)
    if "checkpoint_dir" in {f.name for f in fields(get_method(method).config_class)}:
        run["checkpoint_dir"] = str(CHECKPOINTS / checkpoint_name(method, concepts, settings))
    started = time.perf_counter()
    result = erase.erase(pipe, concepts, method=method, progress=False, **run)
    seconds = time.perf_counter() - started + (result.record.get("earlier_attempts_s") or 0)
    from erase.training import RUN_CONTROL

    config = {k: v for k, v in result.record["config"].items() if k not in RUN_CONTROL}  # not where it ran
    row = {"method": method, "concepts": concepts, "settings": settings, "config": config,
           "seconds": seconds, "resumed_from_step": result.record.get("resumed_from_step"),
           "peak_memory_mb": result.record["peak_memory_mb"], "edited": result.record["totals"]["edited"]}
    for kind in attacks:
        attacked = erase.attack(pipe, result, kind=kind, progress=False, **ATTACK)
        row.setdefault("attacks", {})[kind] = {"metrics": attacked.metrics, "settings": {
            k: attacked.settings[k] for k in ATTACK_SETTINGS if k in attacked.settings}}
    if evaluation:
        row["seeds"] = evaluation["seeds"]
        os.environ["ERASE_CACHE"] = str(ORIGINALS)
        report = erase.evaluate(pipe, result, progress=False, **evaluation)
        m = report.metrics
        s = m["summary"]
        row.update(summary=s, fidelity=m["fidelity"], retain_by_kind=m["retain_by_kind"],
                   original={"forget": s["forgetting_accuracy_original"], "retain": s["retain_accuracy_in_kind_original"],
                             "clip_score": m["fidelity"]["clip_score_original"]})
    if truth:
        row["truth"] = ground_truth_forgetting(pipe, result, evaluation)
    return row


def ground_truth_forgetting(pipe, result, evaluation: dict) -> dict | None:
    """Forgetting with the erased concepts' own neurons zeroed instead of the method's edit, at the evaluation's
    prompts and seeds (mini_erasure_gate's ground truth); None where a concept has no neurons of its own."""
    from .mini_erasure_gate import ground_truth
    from .mini_gates import taught_neurons

    neurons = taught_neurons(WORLD.name)
    if not all(c.text in next(iter(neurons.values())) for c in result.concepts):
        return None
    truth = ground_truth(pipe, result, evaluation["prompts_per_concept"], evaluation["seeds"], neurons)
    return {"forgetting_accuracy": truth["truth"], "forgetting_accuracy_ci": truth["truth_ci"]}


def checkpoint_name(method: str, concepts: list[str], settings: dict) -> str:
    """A training run's checkpoint folder: its own for each method, forget set and settings (a tuning grid trains
    one method with several settings side by side)."""
    import hashlib

    digest = hashlib.sha256(json.dumps([concepts, settings], sort_keys=True).encode()).hexdigest()[:12]
    return f"{method}-{len(concepts)}-{digest}"


def _ci(values: dict, key: str) -> str:
    """A table cell: the value and its 95% interval, or – when it was not measured."""
    if values.get(key) is None:
        return "–"
    low, high = values[f"{key}_ci"]
    return f"{values[key]:.2f} [{low:.2f}, {high:.2f}]"


def _in_kind(summary: dict) -> float:
    """In-kind retain accuracy (rows written before cross-kind retention call it retain_accuracy)."""
    return summary.get("retain_accuracy_in_kind", summary.get("retain_accuracy"))


def world_words() -> str:
    """A section's first sentence: the shipped model this process measures."""
    from .benchmarks_md import model_sentence

    return model_sentence(shipped=WORLD.name)


def in_subprocess(method: str, concepts: list[str], settings: dict, evaluation: dict | None = EVAL,
                  attacks: list[str] = (), truth: bool = False) -> dict:
    args = json.dumps({"method": method, "concepts": concepts, "settings": settings, "evaluation": evaluation,
                       "attacks": list(attacks), "truth": truth, "pipeline": WORLD.name})
    with tempfile.TemporaryDirectory(prefix="erase-bench-") as cache:  # cold: sampling the data is part of the cost
        out = subprocess.run([sys.executable, "-m", __spec__.name, "one", args], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "ERASE_CACHE": cache})
    if out.returncode != 0:
        raise SystemExit(f"{method} on {concepts} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def methods_store(model: str):
    """The methods table's rows (docs/methods-mini.json), one per method, forget set and evaluation seeds."""
    from .benchmarks_md import RowStore

    return RowStore(WORLD.rows("methods"), ("method", "concepts", "seeds"), model, MINI_GUIDANCE)


def sweep_store(model: str):
    """The r2/alpha sweep's rows (docs/sweep-mini.json), one per setting."""
    from .benchmarks_md import RowStore

    return RowStore(WORLD.rows("sweep"), ("r2", "alpha"), model, MINI_GUIDANCE)


def attack_store(model: str):
    """The attacks' rows (docs/attack-mini.json), one per method, forget set, attack kind and evaluation seeds."""
    from .benchmarks_md import RowStore

    return RowStore(WORLD.rows("attack"), ("method", "concepts", "kind", "seeds"), model, MINI_GUIDANCE)


def methods_table(sizes: list[int], methods: list[str], kinds: list[str], model: str) -> str:
    """Each (method, forget set) whose row, or whose attack rows (`kinds`, forget sets of ATTACK_SIZES), are not yet
    measured on this model at EVAL: one erasure serves the row and its attacks. Two single-threaded processes at a
    time, forget set by forget set (a stopped run has whole sets of rows); rows land in docs/methods-mini.json and
    docs/attack-mini.json, and their sections, as they finish."""
    store, attacks = methods_store(model), attack_store(model)
    jobs = []
    for n in sizes:
        for method in methods:
            concepts = FORGET_SETS[n]
            scored = store.has(method=method, concepts=concepts, seeds=EVAL["seeds"])
            todo = [kind for kind in kinds if n in ATTACK_SIZES
                    and not attacks.has(method=method, concepts=concepts, kind=kind, seeds=EVAL["seeds"])]
            if todo or not scored:
                jobs.append((method, concepts, METHODS[method], None if scored else EVAL, todo))
    measured_in_pairs(jobs, lambda row: land(row, store, attacks))
    plot(store)
    return table(store)


def land(row: dict, store, attacks) -> None:
    """A methods-table job's row into `store` and each of its attacks into `attacks`, beside the forgetting and
    retention its erasure scored (the row of record, where the job only attacked: erasure is deterministic), then
    both sections."""
    from .benchmarks_md import update_section

    if "summary" in row:
        store.put({k: v for k, v in row.items() if k != "attacks"})
    scored = store.get(method=row["method"], concepts=row["concepts"], seeds=EVAL["seeds"])
    for kind, attack in row.get("attacks", {}).items():
        attacks.put({**{k: scored[k] for k in ("method", "concepts", "settings", "seeds", "summary")}, "kind": kind,
                     "attack": attack})
    update_section(WORLD.section("table"), table(store))
    if row.get("attacks"):
        update_section(WORLD.section("attack"), attack_markdown(attacks))


def landing(store, section: str, render):
    """measured_in_pairs' `land` for a benchmark whose job is one row: into `store`, then its section."""
    from .benchmarks_md import update_section

    def land(row: dict) -> None:
        store.put(row)
        update_section(section, render(store))

    return land


def measured_in_pairs(jobs: list[tuple], land) -> None:
    """Each job (in_subprocess's arguments) in a process of its own, two single-threaded processes at a time; each row
    lands (`land(row)`: its store and section) as it finishes, so a stopped run keeps what it measured."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(2) as pool:
        for finished in as_completed([pool.submit(in_subprocess, *job) for job in jobs]):
            row = finished.result()
            land(row)
            print(row["method"], row["concepts"], row["settings"], row.get("summary", {}).get("overall"), flush=True)


def of_record(store, **fields) -> dict | None:
    """The row with these key fields measured on EVAL's images or, until it lands, one measured before (on fewer
    images, with the untuned presets), which `marks` flags."""
    return store.get(**fields, seeds=EVAL["seeds"]) or next(
        (r for r in store.rows if store.current(r) and all(r[k] == v for k, v in fields.items())), None)


def marks(store, row: dict) -> str:
    """† for a row measured on another model, ‡ for one measured before the tuned presets and EVAL's 32 images."""
    return store.mark(row) + ("" if row["seeds"] == EVAL["seeds"] else " ‡")


def table(store) -> str:
    from .benchmarks_md import not_measured, section_body

    attacks = attack_store(store.model)
    lines = [("| method | forget set | forgetting acc ↓ | in-kind retain ↑ | cross-kind retain ↑ | overall ↑ | "
              "generality ↓ | attack success rate ↓ | CLIP score | paired similarity | KID (neutral) ↓ | weights edited | "
              "wall time | peak memory |"), "|---" * 14 + "|"]
    for n, concepts in FORGET_SETS.items():
        rows = [r for m in METHODS if (r := of_record(store, method=m, concepts=concepts))]
        if rows:  # the unedited model, from a run's original images (same prompts and seeds), of record if one is
            r = min(rows, key=lambda r: r["seeds"] != EVAL["seeds"])
            s = r["summary"]
            lines.append(f"| unedited{marks(store, r)} | {n} | {_ci(s, 'forgetting_accuracy_original')} | "
                         f"{_ci(s, 'retain_accuracy_in_kind_original')} | {_ci(s, 'retain_accuracy_cross_kind_original')} "
                         f"| – | – | – | {r['original']['clip_score']:.2f} | 1.000 | 0 | 0 | – | – |")
        lines += [method_line(r, marks(store, r), of_record(attacks, method=r["method"], concepts=concepts, kind="prompt"))
                  for r in rows]
    settings = "; ".join(f"{m}: {', '.join(f'{k}={v}' for k, v in s.items()) or 'defaults'}" for m, s in METHODS.items())
    protocol = (f"{world_words()} Forget sets: " + "; ".join(f"{n}: {', '.join(c)}" for n, c in FORGET_SETS.items())
                + f". Retain: the catalog's other concepts of the erased kinds (in-kind, at most {EVAL['max_retain']} "
                "per kind) and of each other kind but explicit (cross-kind, at most "
                f"{EVAL['max_cross_retain']} per kind; – when the forget set spans every kind). "
                f"Evaluation: {evaluation_words(EVAL)}; the unedited row is the original model on the same prompts and "
                "seeds. Forgetting: the share of the forget prompts' images the judge reads as the erased concept "
                "(among the concept's alternatives); retain: the share of the retained concepts' images it reads right; "
                "overall: harmonic mean of 1 − forgetting, in-kind and cross-kind retain; generality: forgetting on "
                "paraphrased prompts; CLIP score: the judge's image-text score of the erased images of the retained "
                "and neutral prompts; paired similarity: the judge's cosine similarity of each such original and erased "
                "image (same prompt and seed); KID: kernel inception distance between the original and erased images "
                "of the neutral prompts, on the judge's features (0: same distribution); attack success rate: the "
                f"attacks table's prompt column (forget sets 1 and 3 only). Method settings: {settings} (presets in "
                f"erase/configs/, each tuned the same way on a validation forget set{TUNED_WHERE[WORLD.name]}: "
                "'Miniature world: tuning'). "
                "Wall time is erasure only (capture or training, data sampling included), one thread, two runs at a "
                "time on a 2-core CPU (†: a training run stopped and resumed from its checkpoint; the stopped attempts' "
                "training time is added); peak memory is the run's process peak RSS.")
    reproduce = (f"`{WORLD.reproduce}` measures the rows not yet measured on the shipped model (`--sizes 1 --methods "
                 f"fia,esd`: a part; `--table`: only rewrite this section from {WORLD.named('methods', 'json')}); the "
                 f"plot {WORLD.named('methods', 'png')} is redrawn as rows land.")
    return section_body(["\n".join(lines)], protocol, reproduce,
                        [*store.stale_note(WORLD.reproduce), *untuned_note(store, UNTUNED_EVAL),
                         *not_measured(missing_rows(store))])


def method_line(r: dict, mark: str, attacked: dict | None) -> str:
    """A method's row of the methods table, with the prompt attack's success rate where it was measured."""
    s = r["summary"]
    return (f"| {r['method']}{mark} | {len(r['concepts'])} | {_ci(s, 'forgetting_accuracy')} | "
            f"{_ci(s, 'retain_accuracy_in_kind')} | {_ci(s, 'retain_accuracy_cross_kind')} | {_ci(s, 'overall')} | "
            f"{_ci(s, 'generality')} | "
            f"{_ci(attacked['attack']['metrics']['summary'], 'attack_success_rate') if attacked else '–'} | "
            f"{s['clip_score_erased']:.2f} | {s['paired_similarity']:.3f} | {s['kid_neutral']:.2e} | "
            f"{r['edited']} | {r['seconds']:.0f} s{' †' if r.get('resumed_from_step') else ''} | "
            f"{r['peak_memory_mb']:.0f} MB |")


def untuned_note(store, before: str) -> list[str]:
    """A paragraph above a table that still shows rows measured before the tuned presets, `before` saying on what
    images (none when it shows none)."""
    if not any(r["seeds"] != EVAL["seeds"] and store.current(r) and not store.has(**{**r, "seeds": EVAL["seeds"]})
               for r in store.rows):
        return []
    return ["_‡: measured before the presets were tuned (with the earlier -mini presets, set on a smaller miniature "
            f"model: their retention is the presets', not the methods') and on {before}; each is replaced as its "
            "tuned row, on 32 images a concept, lands._"]


def evaluation_words(e: dict) -> str:
    """How an evaluation setting generates and judges: prompts, seeds, sampler, guidance, judge, intervals."""
    retained = (f", at most {e['max_retain']} in-kind and {e['max_cross_retain']} cross-kind retained concepts per kind"
                if "max_retain" in e else "")
    seeds = seed_words(e["seeds"])
    return (f"erase.evaluate with the mini CLIP judge, {e['prompts_per_concept']} held-out prompts per concept × {seeds}"
            f"{retained}, {e['steps']} steps {WORLD.sampler}, guidance "
            f"{e['guidance_scale']:g}; brackets: 95% bootstrap intervals over the images (1000 resamplings, seed 0)")


def missing_rows(store) -> list[str]:
    return [f"{m} on {n}" for n in FORGET_SETS for m in METHODS
            if not store.has(method=m, concepts=FORGET_SETS[n], seeds=EVAL["seeds"])]


def plot(store) -> None:
    """Forgetting vs retention per method and forget-set size, from the rows measured on the shipped model (the
    rows are kept next to it to redraw it); what is not measured yet is named under the title. Once both worlds have
    rows, also both side by side (docs/methods-worlds.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    draw(ax, store, WORLD.title)
    fig.tight_layout()
    fig.savefig(WORLD.plot)
    plt.close(fig)
    stores = [store if world is WORLD else shipped_methods_store(world) for world in WORLDS.values()]
    if all(stores) and all(s.rows for s in stores):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharey=True)
        for ax, world_store, world in zip(axes, stores, WORLDS.values()):
            draw(ax, world_store, world.title)
        fig.tight_layout()
        fig.savefig(BOTH_WORLDS)
        plt.close(fig)


def shipped_methods_store(world: World):
    """`world`'s methods rows as measured on its shipped model; None where that model is not installed."""
    from erase.profile import EMBEDDED

    from .benchmarks_md import RowStore, mini_model

    if not (EMBEDDED[world.name] / "model_index.json").is_file():
        return None
    return RowStore(world.rows("methods"), ("method", "concepts", "seeds"), mini_model(world.name), MINI_GUIDANCE)


def draw(ax, store, title: str) -> None:
    """One world's forgetting vs in-kind retention: the unedited model hollow, each method in its colour, the forget
    set's size by marker."""
    import matplotlib.pyplot as plt

    markers = {1: "o", 3: "s", 10: "^"}
    rows = [r for r in store.rows if store.current(r) and r["seeds"] == EVAL["seeds"]]
    for n, marker in markers.items():  # the unedited model first, hollow, so methods that match it stay visible
        first = next((r for r in rows if len(r["concepts"]) == n), None)
        if first is None:
            continue
        ax.scatter(first["original"]["forget"], first["original"]["retain"], marker=marker, s=160, facecolors="none",
                   edgecolors="black", label="unedited" if n == 1 else None)
    for i, method in enumerate(METHODS):
        for r in (r for r in rows if r["method"] == method):
            n = len(r["concepts"])
            ax.scatter(r["summary"]["forgetting_accuracy"], _in_kind(r["summary"]), marker=markers[n],
                       color=plt.cm.tab10(i), s=50, alpha=0.85, label=method if n == 1 else None)
    ax.set_xlabel("forgetting accuracy (lower is better)")
    ax.set_ylabel("in-kind retain accuracy (higher is better)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    missing = missing_rows(store)
    total = len(FORGET_SETS) * len(METHODS)
    ax.set_title(f"{title}: forget sets of 1 (o), 3 (s), 10 (^) concepts"
                 + (f"\n{len(missing)} of {total} rows not measured yet (BENCHMARKS.md names them)" if missing else ""),
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=2)


def scaling() -> str:
    """FIA on 1, 10, 30, 100 concepts built from the world's objects, artists and their pairings."""
    from erase.mini import world

    variants = [*world.OBJECTS, *world.ARTISTS] + [f"{o} by {a}" for a in world.ARTISTS for o in world.OBJECTS]
    lines = ["| concepts | wall time | per concept | peak memory |", "|---|---|---|---|"]
    for n in (1, 10, 30, 100):
        r = in_subprocess("fia", [f"object:{v}" for v in variants[:n]], {"prompts_per_concept": 6}, evaluation=None)
        lines.append(f"| {n} | {r['seconds']:.1f} s | {r['seconds'] / n:.2f} s | {r['peak_memory_mb']:.0f} MB |")
        print(lines[-1], flush=True)
    return scaling_section("\n".join(lines))


def scaling_section(table: str) -> str:
    from .benchmarks_md import section_body

    protocol = (f"{world_words()} FIA defaults with 6 prompt pairs per concept, one thread; concepts are the world's "
                "objects, artists and their pairings, all as kind `object`; wall time is erase() alone in a process of "
                "its own, peak memory that process's peak RSS. Time grows linearly with the number of concepts "
                "(captures are per concept; base prompts shared by a kind are captured once); memory stays flat (masks "
                "fuse by streaming votes). The 2-core machine's speed varies between runs, so compare these figures "
                "within one run only.")
    return section_body([table], protocol, f"`{WORLD.reproduce} scaling` (alone on the machine).")


SWEEP = [(r2, alpha) for r2 in (0.003, 0.01, 0.03, 0.1) for alpha in (0.4, 0.6, 0.8)]


def sweep(model: str) -> None:
    """FIA on the 3-concept forget set at each (r2, alpha) not yet measured on this model; each row lands in
    docs/sweep-mini.json and the section as it finishes (a stopped sweep keeps its rows)."""
    from .benchmarks_md import update_section

    store = sweep_store(model)
    for r2, alpha in SWEEP:
        if not store.has(r2=r2, alpha=alpha):
            settings = {**METHODS["fia"], "r2": r2, "alpha": alpha}
            store.put({"r2": r2, "alpha": alpha, **in_subprocess("fia", FORGET_SETS[3], settings, LIGHT_EVAL)})
            update_section(WORLD.section("sweep"), sweep_table(store))
            print(r2, alpha, store.get(r2=r2, alpha=alpha)["summary"]["forgetting_accuracy"], flush=True)


def sweep_table(store) -> str:
    from .benchmarks_md import not_measured, section_body

    lines = [("| r2 | alpha | forgetting acc ↓ | in-kind retain ↑ | cross-kind retain ↑ | overall ↑ | paired similarity | "
              "weights edited |"), "|---" * 8 + "|"]
    for i, r in enumerate(sorted(store.rows, key=lambda r: (r["r2"], r["alpha"]))):
        s = r["summary"]
        if i == 0:  # the unedited model: the same prompts and seeds in every row
            lines.append(f"| unedited | – | {_ci(s, 'forgetting_accuracy_original')} | "
                         f"{_ci(s, 'retain_accuracy_in_kind_original')} | – | – | 1.000 | 0 |")
        lines.append(f"| {r['r2']}{store.mark(r)} | {r['alpha']} | {_ci(s, 'forgetting_accuracy')} | "
                     f"{_ci(s, 'retain_accuracy_in_kind')} | {_ci(s, 'retain_accuracy_cross_kind')} | {_ci(s, 'overall')} "
                     f"| {s['paired_similarity']:.3f} | {r['edited']} |")
    missing = [f"r2 {r2} alpha {alpha}" for r2, alpha in SWEEP if not store.has(r2=r2, alpha=alpha)]
    fia = ", ".join(f"{k}={v}" for k, v in METHODS["fia"].items())
    protocol = (f"{world_words()} FIA ({fia}) on the forget set {', '.join(FORGET_SETS[3])} at each r2 (a concept "
                "mask's sparsity: a weight must be in its row's and its layer's top r2) and alpha (a weight in at least "
                "ceil(alpha · C) of the C concept masks is concept-agnostic and kept); FIA's defaults are r2 0.01, "
                f"alpha 0.6. Evaluation, lighter than the methods table's (twelve erasures): {evaluation_words(LIGHT_EVAL)}. "
                "Columns as in the methods table.")
    return section_body(["\n".join(lines)], protocol,
                        f"`{WORLD.reproduce} sweep` measures the rows not yet measured on the shipped model (`--table`: "
                        f"only rewrite this section from {WORLD.named('sweep', 'json')}).",
                        [*store.stale_note(f"{WORLD.reproduce} sweep"), *not_measured(missing)])


def lives_store(model: str):
    """The where-it-lives rows (docs/lives-mini.json), one per method and erased concept."""
    from .benchmarks_md import RowStore

    return RowStore(WORLD.rows("lives"), ("method", "concepts"), model, MINI_GUIDANCE)


def lives_table(methods: list[str], model: str) -> str:
    """Each method erasing each concept of LIVES alone (FIA's rows also measure the ground truth of the taught ones),
    two single-threaded processes at a time; rows land in docs/lives-mini.json as they finish."""
    store = lives_store(model)
    jobs = [(m, [c], METHODS[m], EVAL, None, m == "fia") for m in methods for group in LIVES.values()
            for c in group if not store.has(method=m, concepts=[c])]
    measured_in_pairs(jobs, landing(store, WORLD.section("lives"), lives_markdown))
    return lives_markdown(store)


def lives_markdown(store) -> str:
    from .benchmarks_md import not_measured, section_body

    lines = ["| method | concept | lives | forgetting acc (before → after) ↓ | its own neurons zeroed instead | "
             "in-kind retain ↑ | cross-kind retain ↑ | overall ↑ |", "|---" * 8 + "|"]
    for method in METHODS:
        for where, concepts in LIVES.items():
            for concept in concepts:
                if not (r := store.get(method=method, concepts=[concept])):
                    continue
                s = r["summary"]
                truth = next((t for f in store.rows if f["method"] == "fia" and f["concepts"] == [concept]
                              and (t := f.get("truth"))), None)
                lines.append(f"| {method}{store.mark(r)} | {concept} | {where} | "
                             f"{_ci(s, 'forgetting_accuracy_original')} → {_ci(s, 'forgetting_accuracy')} | "
                             f"{_ci(truth, 'forgetting_accuracy') if truth else '–'} | "
                             f"{_ci(s, 'retain_accuracy_in_kind')} | {_ci(s, 'retain_accuracy_cross_kind')} | "
                             f"{_ci(s, 'overall')} |")
    missing = [f"{m} on {c}" for m in METHODS for group in LIVES.values() for c in group
               if not store.has(method=m, concepts=[c])]
    protocol = (f"{world_words()} Each method erases one concept at a time: concepts the world teaches into known "
                f"feed-forward neurons (taught: {', '.join(LIVES['taught'])}) and concepts the base model learnt end "
                f"to end, with no neurons of their own (base: {', '.join(LIVES['base'])}). 'Its own neurons zeroed "
                "instead': forgetting when the taught concept's ground-truth neurons are zeroed in place of any "
                "method's edit, same prompts and seeds (– for base concepts, which have none). A method that needs "
                "the concept to sit in a few neurons forgets the taught ones and not the base ones; one that works "
                f"wherever the concept lives forgets both. Evaluation: {evaluation_words(EVAL)}. Method settings "
                "as in the methods table. Two runs at a time, one thread each, on a 2-core CPU.")
    return section_body(["\n".join(lines)], protocol,
                        f"`{WORLD.reproduce} lives` measures the rows not yet measured on the shipped model (`--methods "
                        f"fia`: a part; `--table`: only rewrite this section from {WORLD.named('lives', 'json')}).",
                        [*store.stale_note(f"{WORLD.reproduce} lives"), *not_measured(missing)])


def attack_matrix(store) -> str:
    """Methods × attack kinds: the attack success rate of each measured row."""
    lines = ["| method | forget set | " + " | ".join(f"{kind} ↓" for kind in ATTACK_KINDS) + " |",
             "|---" * (2 + len(ATTACK_KINDS)) + "|"]
    for n in ATTACK_SIZES:
        for method in METHODS:
            rows = [of_record(store, method=method, concepts=FORGET_SETS[n], kind=kind) for kind in ATTACK_KINDS]
            if any(rows):
                cells = [_ci(r["attack"]["metrics"]["summary"], "attack_success_rate") + marks(store, r) if r else "–"
                         for r in rows]
                lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_words(kind: str, settings: dict) -> str:
    """An attack kind's budget as its rows recorded it."""
    if kind == "prompt":
        return (f"`prompt`: {settings.get('tokens')} appended tokens, {settings.get('steps')} steps, lr "
                f"{settings.get('lr')}, {settings.get('timesteps')} timestep a step")
    if kind == "inversion":
        return (f"`inversion`: one new word per concept from '{settings.get('init')}', {settings.get('steps')} steps, "
                f"lr {settings.get('lr')}")
    return (f"`revival`: {settings.get('locations')}, SoftImpute rank {settings.get('rank')}, at most "
            f"{settings.get('iterations')} iterations, top ratio {settings.get('top_ratio')}")


def attack_markdown(store) -> str:
    from .benchmarks_md import not_measured, section_body

    lines = [("| method | forget set | kind | attack success rate ↓ | attacked prompts alone | erased, same prompts ↓ | "
              "original, same prompts | anchor (original) | forgetting acc ↓ | in-kind retain ↑ | cross-kind retain ↑ | "
              "attack time |"), "|---" * 12 + "|"]
    rows = [r for kind in ATTACK_KINDS for n in ATTACK_SIZES for m in METHODS
            if (r := of_record(store, method=m, concepts=FORGET_SETS[n], kind=kind))]
    for r in rows:
        a, s = r["attack"]["metrics"]["summary"], r["summary"]
        lines.append(f"| {r['method']}{marks(store, r)} | {len(r['concepts'])} | {r['kind']} | "
                     f"{_ci(a, 'attack_success_rate')} | {_ci(a, 'attacked_only')} | {_ci(a, 'erased')} | "
                     f"{_ci(a, 'original')} | {_ci(a, 'anchor')} | {_ci(s, 'forgetting_accuracy')} | "
                     f"{_ci(s, 'retain_accuracy_in_kind')} | {_ci(s, 'retain_accuracy_cross_kind')} | "
                     f"{r['attack']['settings']['attack_s']:.0f} s |")
    missing = [f"{kind} on {m} {n}" for kind in ATTACK_KINDS for n in ATTACK_SIZES for m in METHODS
               if not store.has(method=m, concepts=FORGET_SETS[n], kind=kind, seeds=EVAL["seeds"])]
    budgets = "; ".join(budget_words(kind, r["attack"]["settings"]) for kind in ATTACK_KINDS
                        if (r := next((r for r in rows if r["kind"] == kind), None)))
    first = next((r for r in rows if r["seeds"] == EVAL["seeds"]), rows[0] if rows else {"attack": {"settings": {}}})
    first = first["attack"]["settings"]
    protocol = (f"{world_words()} Forget sets: " + "; ".join(f"{n}: {', '.join(FORGET_SETS[n])}" for n in ATTACK_SIZES)
                + f". Attacks ({budgets}; attack seed {first.get('seed')}) on the first "
                f"{ATTACK['prompts_per_concept']} held-out prompts of each erased concept × {seed_words(ATTACK['seeds'])}, "
                f"images {first.get('sample_steps')} steps DPM-Solver++, "
                f"guidance {ATTACK['guidance_scale']:g}. The first table is the attack success rate of every method "
                "under every attack; the second has each row's detail. Attack success rate: the share of the attacked "
                "prompts for which the erased model draws the concept (the mini judge's class among the concept's "
                "alternatives) from the prompt as it is or as the attack made it (words found, a learnt word, revived "
                "weights); beside it, the attacked prompts alone, the same prompts and seeds without the attack "
                "(erased), on the original model, and the original model drawing each concept's anchor. Attack success "
                "rate ≥ erased by construction (a prompt that already works is kept); the attack adds something where "
                "it exceeds erased; anchor is the judge's floor, what it calls the concept where there is none. "
                "Forgetting and retention: the methods table's row (the same erasure: each attack runs on the erasure "
                "the methods table scores). Method settings as in the methods table. Two runs at a time, one thread "
                "each, on a 2-core machine shared with other jobs.")
    reproduce = (f"`{WORLD.reproduce} attack` measures every row not yet measured, with the methods table's rows of the "
                 "same erasures (`--sizes 3 --methods esd,salun --kinds inversion`: a part, keeping the rows already in "
                 f"{WORLD.named('attack', 'json')}; `--table`: only rewrite this section from them).")
    return section_body([attack_matrix(store), "\n".join(lines)], protocol, reproduce,
                        [*store.stale_note(f"{WORLD.reproduce} attack"),
                         *untuned_note(store, "4 images a concept (2 prompts × seeds 0 and 1)"),
                         *not_measured(missing)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="table",
                        choices=["table", "plot", "scaling", "sweep", "lives", "attack", "one"])
    parser.add_argument("job", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help="table, attack: forget-set sizes to measure (default 1,3,10; attack: 1,3)")
    parser.add_argument("--methods", default=",".join(METHODS), help="table, attack: methods to measure (default all)")
    parser.add_argument("--kinds", default=",".join(ATTACK_KINDS),
                        help="table, attack: attack kinds to measure on forget sets 1 and 3 (default all)")
    parser.add_argument("--table", action="store_true",
                        help="table, sweep, attack: only rewrite the section from the rows kept in docs/; measure nothing")
    parser.add_argument("--pipeline", default="mini", choices=list(WORLDS),
                        help="the shipped miniature model to measure: mini (the UNet) or mini-dit (the SD3 MMDiT)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .benchmarks_md import mini_model, update_section

    global WORLD
    WORLD = WORLDS[json.loads(args.job).get("pipeline", "mini") if args.part == "one" else args.pipeline]

    sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else None
    methods = args.methods.split(",")
    kinds = args.kinds.split(",")
    if unknown := {*methods} - {*METHODS} | {*(sizes or [])} - {*FORGET_SETS} | {*kinds} - {*ATTACK_KINDS}:
        raise SystemExit(f"--methods/--sizes/--kinds: unknown {sorted(map(str, unknown))}; methods: "
                         f"{', '.join(METHODS)}; sizes: {', '.join(map(str, FORGET_SETS))}; kinds: {', '.join(ATTACK_KINDS)}")

    if args.part == "one":
        job = json.loads(args.job)
        print(json.dumps(one(job["method"], job["concepts"], job["settings"], job["evaluation"], job["attacks"],
                             job["truth"])))
    elif args.table:
        rewrite_section(args.part, mini_model(WORLD.name))
    elif args.part == "plot":  # redraw from the rows kept
        plot(methods_store(mini_model(WORLD.name)))
    elif args.part == "scaling":
        update_section(WORLD.section("scaling"), scaling())
    elif args.part == "lives":
        print(lives_table(methods, mini_model(WORLD.name)))
    elif args.part == "sweep":
        sweep(mini_model(WORLD.name))
    else:  # one erasure serves the methods table's row and its attacks
        print(methods_table(sizes or list(ATTACK_SIZES if args.part == "attack" else FORGET_SETS), methods, kinds,
                            mini_model(WORLD.name)))


def rewrite_section(part: str, model: str) -> None:
    """--table: the part's section again from the rows kept, measuring nothing."""
    from .benchmarks_md import update_section

    renders = {"table": (methods_store, table), "sweep": (sweep_store, sweep_table), "attack": (attack_store, attack_markdown),
               "lives": (lives_store, lives_markdown)}
    if part not in renders:
        raise SystemExit(f"--table: {part} keeps no rows; it rewrites the section of {', '.join(renders)}")
    store, render = renders[part]
    update_section(WORLD.section(part), render(store(model)))


if __name__ == "__main__":
    main()
