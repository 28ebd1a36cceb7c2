"""Revival of pruned concepts on the miniature world, recorded in BENCHMARKS.md ("Miniature world: revival").

    HF_HUB_OFFLINE=1 python -m erase_lab.bench_revival [--methods fia,conceptprune] [--sizes 1,10] [--again]
    python -m erase_lab.bench_revival --table      # rewrite the section from the rows kept, measuring nothing
    HF_HUB_OFFLINE=1 python -m erase_lab.bench_revival --pipeline mini-dit   # the miniature SD3's

For each masking method, forget set and fill of the masked weights (exact zeros, as published, or noise drawn from
each row's weights): forgetting, in- and cross-kind retention, paired similarity and KID on neutral prompts (the
evaluator), then the revival attack (erase.attack kind 'revival') twice: by an attacker with the erased checkpoint
alone (its exact zeros), and by one who also has patch.safetensors (the edited locations). Rows land in
docs/revival-mini.json (the miniature SD3's: docs/revival-mini-dit.json) one at a time; a rerun measures only the
rows not there yet.
"""

from __future__ import annotations

import argparse
import os
import time

from .benchmarks_md import WORLDS, World
from .mini_gates import MINI_GUIDANCE

IMAGENETTE = ["tench", "english springer", "cassette player", "chain saw", "church", "french horn", "garbage truck",
              "gas pump", "golf ball", "parachute"]
FORGET_SETS = {1: ["church"], 10: IMAGENETTE}
METHODS = {"fia": {"config": "fia-object"}, "conceptprune": {}}
FILLS = ("zeros", "noise")
PROMPTS = {1: 4, 10: 2}  # held-out prompts per concept, each with seeds 0 and 1
SEEDS = [0, 1]


def measure(pipe, method: str, size: int, fill: str) -> dict:
    import erase

    concepts = FORGET_SETS[size]
    settings = {"prompts_per_concept": PROMPTS[size], "seeds": SEEDS}
    started = time.perf_counter()
    result = erase.erase(pipe, concepts, method=method, progress=False, fill=fill, **METHODS[method])
    seconds = time.perf_counter() - started
    summary = erase.evaluate(pipe, result, progress=False, **settings).metrics["summary"]
    row = {"method": method, "size": size, "fill": fill, "concepts": concepts, "settings": METHODS[method],
           "edited": result.record["totals"]["edited"], "seconds": round(seconds, 1),
           "summary": {k: summary[k] for k in ("forgetting_accuracy", "forgetting_accuracy_ci",
                                               "forgetting_accuracy_original", "retain_accuracy_in_kind",
                                               "retain_accuracy_in_kind_ci", "retain_accuracy_cross_kind",
                                               "retain_accuracy_cross_kind_ci", "paired_similarity", "kid_neutral")}}
    for locations in ("zeros", "patch"):
        started = time.perf_counter()
        attacked = erase.attack(pipe, result, kind="revival", progress=False, locations=locations, **settings)
        rates = attacked.metrics["summary"]
        row[f"revival_{locations}"] = {"attack_success_rate": rates["attack_success_rate"],
                                       "attack_success_rate_ci": rates["attack_success_rate_ci"],
                                       "attacked_only": rates["attacked_only"],
                                       "revived": attacked.records[0]["revived"],
                                       "seconds": round(time.perf_counter() - started, 1)}
    return row


def _ci(values: dict, key: str) -> str:
    low, high = values[f"{key}_ci"]
    return f"{values[key]:.2f} [{low:.2f}, {high:.2f}]"


def table(store, world: World) -> str:
    from .benchmarks_md import model_sentence, not_measured, section_body

    lines = [("| method | forget set | masked weights set to | weights edited | forgetting ↓ (original) | in-kind retain ↑ "
             "| cross-kind retain ↑ | paired similarity | KID (neutral) ↓ | revival, checkpoint alone ↓ (weights "
             "revived) | revival, with the patch ↓ | erasure time |"), "|---" * 12 + "|"]
    for r in sorted(store.rows, key=lambda r: (r["size"], list(METHODS).index(r["method"]), FILLS.index(r["fill"]))):
        s, alone, patch = r["summary"], r["revival_zeros"], r["revival_patch"]
        lines.append(f"| {r['method']}{store.mark(r)} | {r['size']} | {r['fill']} | {r['edited']} | "
                     f"{_ci(s, 'forgetting_accuracy')} ({s['forgetting_accuracy_original']:.2f}) | "
                     f"{_ci(s, 'retain_accuracy_in_kind')} | {_ci(s, 'retain_accuracy_cross_kind')} | "
                     f"{s['paired_similarity']:.3f} | {s['kid_neutral']:.2e} | {_ci(alone, 'attack_success_rate')} "
                     f"({alone['revived']}) | {_ci(patch, 'attack_success_rate')} | {r['seconds']:.0f} s |")
    missing = [f"{m} on {n} ({f})" for n in FORGET_SETS for m in METHODS for f in FILLS
               if not store.has(method=m, size=n, fill=f)]
    protocol = (f"{model_sentence(shipped=world.name)} Forget sets: 1: church; 10: the Imagenette classes "
                f"({', '.join(IMAGENETTE)}). "
                "Settings: fia: erase/configs/fia-object.yaml; conceptprune: defaults; `fill` as the column says "
                "(zeros: pruning as published; noise: each masked weight drawn from N(mean, std) of its row's unmasked "
                "weights, seeded). Evaluation: erase.evaluate with the mini CLIP judge, "
                f"{PROMPTS[1]} (1 concept) or {PROMPTS[10]} (10) held-out prompts per concept × seeds "
                f"{', '.join(map(str, SEEDS))}, 25 steps {world.sampler}, guidance {MINI_GUIDANCE:g}; brackets: 95% "
                "bootstrap intervals; forgetting, retain, paired similarity and KID as in the methods table, with the "
                "original model's forgetting in brackets. Revival: erase.attack kind 'revival' (SoftImpute of the "
                "pruned entries of every edited weight, rank 50, ≤ 100 iterations; signs of the top 60% completed "
                "magnitudes; magnitudes ≥ the row's largest kept weight), on the same prompts and seeds; its success "
                "rate counts an image judged the concept with the revived weights or the erased ones. 'Checkpoint "
                "alone': the attacker finds the pruned entries as exact zeros outside all-zero columns and rows (the "
                "mini model ships dead FFN units as zero columns); 'with the patch': the attacker reads the edited "
                "locations from patch.safetensors. Erasure time: one thread, beside other jobs on a 2-core machine.")
    command = world.command("bench_revival")
    return section_body(["\n".join(lines)], protocol,
                        f"`{command}` measures the rows not yet measured (`--again`: all of them; `--table`: only "
                        f"rewrite this section from {world.named('revival', 'json')}).",
                        [*store.stale_note(command), *not_measured(missing)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated masking methods")
    parser.add_argument("--sizes", default="1,10", help="comma-separated forget-set sizes (1, 10)")
    parser.add_argument("--again", action="store_true", help="measure rows already recorded again")
    parser.add_argument("--table", action="store_true", help="only rewrite the section from its rows; measure nothing")
    parser.add_argument("--pipeline", default="mini", choices=list(WORLDS),
                        help="the shipped miniature model: mini (the UNet) or mini-dit (the SD3 MMDiT)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    methods, sizes = args.methods.split(","), [int(n) for n in args.sizes.split(",")]
    if unknown := {*methods} - {*METHODS} | {*sizes} - {*FORGET_SETS}:
        raise SystemExit(f"--methods/--sizes: unknown {sorted(map(str, unknown))}; methods: {', '.join(METHODS)}; "
                         f"sizes: {', '.join(map(str, FORGET_SETS))}")
    import torch

    import erase

    from .benchmarks_md import RowStore, mini_model, update_section

    world = WORLDS[args.pipeline]
    store = RowStore(world.rows("revival"), ("method", "size", "fill"), mini_model(world.name), MINI_GUIDANCE)
    if args.table:
        return update_section(world.section("revival"), table(store, world))
    torch.set_num_threads(1)
    pipe = erase.load_pipeline(world.name)
    for size in sizes:
        for method in methods:
            for fill in FILLS:
                if args.again or not store.has(method=method, size=size, fill=fill):
                    store.put(measure(pipe, method, size, fill))
                    update_section(world.section("revival"), table(store, world))
                    print(method, size, fill, flush=True)


if __name__ == "__main__":
    main()
