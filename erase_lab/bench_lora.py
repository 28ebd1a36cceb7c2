"""How much of a training method's erasure its LoRA keeps, by rank, on the miniature world (forget set: church).

    HF_HUB_OFFLINE=1 python -m erase_lab.bench_lora                         # every training method, ranks 1, 4, 16, full
    HF_HUB_OFFLINE=1 python -m erase_lab.bench_lora --methods esd,uce --ranks 1,4
    python -m erase_lab.bench_lora --table                                  # rewrite the section from the rows kept

Each method erases church once (the methods table's presets), then the full edit and its LoRA at each rank (what
`--lora RANK` writes, applied at scale 1: low-rank deltas on Linear/Conv weights, no biases or norms) are evaluated
against the original with the methods table's settings. Rows land in docs/lora-mini.json one at a time (a run can
stop and go on with --methods); each landing rewrites the section "Miniature world: LoRA rank" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

from .bench_methods import EVAL, METHODS, ROOT, _ci, evaluation_words

SECTION = "Miniature world: LoRA rank"
REPRODUCE = "HF_HUB_OFFLINE=1 python -m erase_lab.bench_lora"
ROWS = ROOT / "docs" / "lora-mini.json"
CONCEPTS = ["church"]
TRAINING = ["esd", "uce", "salun", "dynamic"]
# The methods table's evaluation with one seed (not its three): a row is then about 5 min on a busy CPU thread, not 15.
SETTINGS = {**EVAL, "seeds": [0]}
RANKS = ["1", "4", "16", "full"]


def rows_of_method(method: str, ranks: list, skip):
    """Yield the rows of one method: the full edit, then its LoRA at each rank for which `skip(rank)` is false."""
    import erase
    from erase.lora import to_lora

    pipe = erase.load_pipeline("mini")
    started = time.perf_counter()
    result = erase.erase(pipe, CONCEPTS, method=method, progress=False, **METHODS[method])
    seconds = time.perf_counter() - started
    for rank in ["edit", *ranks]:
        if skip(str(rank)):
            continue
        lora = None if rank == "edit" else to_lora(pipe.unet, result.edit, rank)
        erased = result if lora is None else replace(result, edit=lora.edit(pipe.unet))
        report = erase.evaluate(pipe, erased, progress=False, **SETTINGS)
        yield {"method": method, "rank": str(rank), "summary": report.metrics["summary"], "erase_seconds": seconds,
               "lora": None if lora is None else {k: v for k, v in lora.record.items() if k not in ("layers", "not_lora")}
               | {"layers": len(lora.record["layers"]), "not_lora": sorted(lora.record["not_lora"]),
                  "bytes": sum(t.numel() * t.element_size() for t in lora.tensors.values())}}


def row_line(r: dict, mark: str = "") -> str:
    s, lora = r["summary"], r["lora"]
    left = "–" if lora is None else (f"{100 * lora['dropped']:.3g}% ({100 * lora['dropped_by_rank']:.3g}% / "
                                      f"{100 * lora['dropped_not_lora']:.3g}%)")
    size = "–" if lora is None else f"{lora['bytes'] / 1024:.0f} KiB, {lora['layers']} layers"
    rank = "full edit" if r["rank"] == "edit" else f"full ({lora['file_rank']})" if r["rank"] == "full" else r["rank"]
    return (f"| {r['method']}{mark} | {rank} | {_ci(s, 'forgetting_accuracy')} | {_ci(s, 'retain_accuracy_in_kind')} | "
            f"{_ci(s, 'retain_accuracy_cross_kind')} | {s['paired_similarity']:.3f} | {left} | {size} |")


def table(store) -> str:
    from .benchmarks_md import model_sentence, section_body

    lines = [("| method | LoRA rank | forgetting acc ↓ | in-kind retain ↑ | cross-kind retain ↑ | paired similarity | "
              "edit's norm left out (rank / biases, norms) | LoRA file |"), "|---" * 8 + "|"]
    order = {rank: i for i, rank in enumerate(["edit", *RANKS])}
    rows = sorted(store.rows, key=lambda r: (TRAINING.index(r["method"]), order.get(r["rank"], len(order))))
    for r in rows[:1]:
        s = r["summary"]
        lines.append(f"| unedited{store.mark(r)} | – | {_ci(s, 'forgetting_accuracy_original')} | "
                     f"{_ci(s, 'retain_accuracy_in_kind_original')} | {_ci(s, 'retain_accuracy_cross_kind_original')} "
                     "| 1.000 | – | – |")
    lines += [row_line(r, store.mark(r)) for r in rows]
    measured = {(r["method"], r["rank"]) for r in rows if store.has(**r)}
    missing = {m: [rank for rank in ["edit", *RANKS] if (m, rank) not in measured] for m in TRAINING}
    settings = "; ".join(f"{m}: {METHODS[m].get('config', 'defaults')}" for m in TRAINING)
    protocol = (f"{model_sentence()} Forget set: {', '.join(CONCEPTS)}. Each method erases once; its full edit and the "
                "LoRA that `--lora RANK` writes of it (SVD of each edited Linear/Conv weight's delta, scale 1; biases "
                "and norm weights are not LoRA-able and left out) are evaluated against the unedited model with the "
                f"methods table's settings but one seed: {evaluation_words(SETTINGS)}, the same prompts and seeds in "
                "every row; columns as in the methods table. Norm left out: the Frobenius norm of what the LoRA does "
                "not hold over the edit's (the SVD tail / biases and norms; squares add). LoRA file: its size and "
                f"the number of layers it holds. Method settings: {settings} (presets in erase/configs/).")
    todo = [todo_line(m, ranks) for m, ranks in missing.items() if ranks]
    return section_body(["\n".join(lines)], protocol,
                        f"`{REPRODUCE}` (one CPU thread; each evaluation takes minutes; `--table`: only rewrite this "
                        "section from docs/lora-mini.json).",
                        [*store.stale_note(REPRODUCE), *([f"_Not measured yet: {'; '.join(todo)}._"] if todo else [])])


def todo_line(method: str, ranks: list[str]) -> str:
    """The rows of a method still to measure, and the command that measures them."""
    names = ", ".join("full edit" if r == "edit" else f"rank {r}" for r in ranks)
    command = f"{REPRODUCE} --methods {method} --ranks {','.join(r for r in ranks if r != 'edit')}"
    return f"{method} ({names}): `{command.removesuffix(' --ranks ')}`"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(TRAINING), help="comma-separated training methods")
    parser.add_argument("--ranks", default=",".join(RANKS), help="comma-separated LoRA ranks, or full")
    parser.add_argument("--again", action="store_true", help="measure rows already in docs/lora-mini.json again")
    parser.add_argument("--table", action="store_true", help="only rewrite the section from docs/lora-mini.json; measure nothing")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from erase.lora import parse_rank

    from .benchmarks_md import RowStore, mini_model, update_section

    torch.set_num_threads(1)
    ranks = [parse_rank(r) for r in args.ranks.split(",")]
    store = RowStore(ROWS, ("method", "rank"), mini_model(), SETTINGS["guidance_scale"])
    if args.table:
        return update_section(SECTION, table(store))
    for method in args.methods.split(","):
        if method not in TRAINING:
            raise SystemExit(f"--methods: {method!r} is not a training method; choose from {', '.join(TRAINING)}")

        def skip(rank: str) -> bool:
            return not args.again and store.has(method=method, rank=rank)

        if all(skip(str(rank)) for rank in ["edit", *ranks]):
            continue
        for row in rows_of_method(method, ranks, skip):
            store.put(row)
            update_section(SECTION, table(store))
            print(row_line(row), flush=True)

if __name__ == "__main__":
    main()
