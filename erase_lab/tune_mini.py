"""Every method tuned the same way on the miniature world, on concepts no test forget set holds.

    HF_HUB_OFFLINE=1 python -m erase_lab.tune_mini                 # every setting not yet measured (hours on 2 cores)
    HF_HUB_OFFLINE=1 python -m erase_lab.tune_mini --methods esd   # one method's grid
    python -m erase_lab.tune_mini --table                          # rewrite the section from the rows kept
    python -m erase_lab.tune_mini --table --presets                # and write each choice as its -mini preset
    HF_HUB_OFFLINE=1 python -m erase_lab.tune_mini --probe --methods salun  # why a method collapses: one knob at a time

One budget for all: each method gets a grid of at most 12 settings over its main knobs, each setting erases the
validation forget set and is screened on 4 images a concept (LIGHT_EVAL); each method's two best settings are then
evaluated again on 32 images a concept (4 held-out prompts × seeds 0-7), and the better overall there is the
method's choice, to become its `-mini` preset in erase/configs/. The validation concepts (two taught objects and a
taught artist) are in none of the methods table's forget sets, so its test rows are not chosen on. A method that
collapses at every setting is probed one knob at a time from a screened setting (PROBES), to find which part of it
does it. Each setting runs in a process of its own, two at a time with one thread each; rows land in
docs/tune-mini.json as they finish and a rerun measures only what is missing. Section of BENCHMARKS.md: "Miniature
world: tuning".
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .bench_methods import EVAL, FORGET_SETS, LIGHT_EVAL, METHODS, _ci, evaluation_words, landing, measured_in_pairs

ROOT = Path(__file__).resolve().parent.parent
ROWS = ROOT / "docs" / "tune-mini.json"
SECTION = "Miniature world: tuning"
REPRODUCE = "HF_HUB_OFFLINE=1 python -m erase_lab.tune_mini"
VALIDATION = ["cassette player", "french horn", "roy lichtenstein"]
SCREEN, FINAL = LIGHT_EVAL, EVAL  # every setting on 4 images a concept; the FINALISTS best again on 32
FINALISTS = 2
GRIDS = {  # at most 12 settings a method, over the knobs its paper tunes
    "fia": [{"fill": "zeros", "r2": r2, "alpha": alpha} for r2 in (0.003, 0.01, 0.03) for alpha in (0.4, 0.6, 0.8)],
    "conceptprune": [{"fill": "zeros", "skill_ratio": ratio} for ratio in (0.003, 0.01, 0.02, 0.05)],
    # λ weighs keeping every other direction against the edit: next to ‖c‖² of the concept's embedding (hundreds for
    # CLIP's last token) values up to 2 leave the edit as it is, so the grid spans the range where it acts.
    "uce": [{"lam": lam} for lam in (0.5, 10.0, 100.0, 300.0, 1000.0, 3000.0)],
    "esd": [{"config": "esd-mini", "lr": lr, "steps": steps} for lr in (1e-4, 2e-4, 5e-4, 2e-3) for steps in (150, 300)],
    # SalUn's remap target as in its code (the model being trained) and the unedited model's: the probes below found
    # the first one costs the retained concepts.
    "salun": [{"config": "salun-mini", "lr": lr, "saliency_fraction": fraction, **target}
              for target in ({}, {"remap_target": "original"}) for lr in (1e-4, 5e-4, 2e-3) for fraction in (0.25, 0.5)],
    "dynamic": [{"config": "dynamic-mini", "lr": lr, "density": density}
                for lr in (5e-5, 2e-4, 5e-4) for density in (0.25, 0.5)],
}
# A method whose retention collapses at every setting of its grid: one knob at a time from a screened setting (its
# first entry), to find which part of the method does it (the retain term's weight, the layers trained).
PROBES = {"salun": [{"config": "salun-mini", "lr": 5e-4, "saliency_fraction": 0.5, **change}
                    for change in ({}, {"retain_weight": 0.0}, {"retain_weight": 5.0}, {"train": "unet"},
                                   {"sample_guidance": 2.0}, {"remap_target": "original"})]}
assert all(len(grid) <= 12 for grid in GRIDS.values()) and set(GRIDS) == set(METHODS)
assert not set(VALIDATION) & {c for concepts in FORGET_SETS.values() for c in concepts}


def store(model: str):
    from .benchmarks_md import RowStore
    from .mini_gates import MINI_GUIDANCE

    return RowStore(ROWS, ("method", "settings", "seeds"), model, MINI_GUIDANCE)


def measure(methods: list[str], model: str) -> None:
    """Each (method, setting) not yet screened on this model, then each method's finalists not yet evaluated on 32
    images; two single-threaded processes at a time; each row lands in docs/tune-mini.json and the section as it
    finishes."""
    rows = store(model)
    screen = [(m, VALIDATION, s, SCREEN) for m in methods for s in GRIDS[m] if not screened(rows, m, s)]
    measured_in_pairs(screen, landing(rows, SECTION, section))
    final = [(m, VALIDATION, r["settings"], FINAL) for m in methods for r in finalists(rows, m)
             if not rows.has(method=m, settings=r["settings"], seeds=FINAL["seeds"])]
    measured_in_pairs(final, landing(rows, SECTION, section))


def probe(methods: list[str], model: str) -> None:
    """Each probe of PROBES not yet screened, as the grids are."""
    rows = store(model)
    jobs = [(m, VALIDATION, s, SCREEN) for m in methods for s in PROBES.get(m, []) if not screened(rows, m, s)]
    measured_in_pairs(jobs, landing(rows, SECTION, section))


def screened(rows, method: str, setting: dict) -> dict | None:
    return rows.get(method=method, settings=setting, seeds=SCREEN["seeds"])


def finalists(rows, method: str) -> list[dict]:
    """The screened rows of `method`'s FINALISTS best settings (by overall; grid order on a tie), once its whole grid
    is screened; none before."""
    measured = [screened(rows, method, s) for s in GRIDS[method]]
    if not all(measured):
        return []
    return sorted(measured, key=lambda r: -r["summary"]["overall"])[:FINALISTS]


def chosen(rows, method: str) -> dict | None:
    """`method`'s choice: the finalist with the best overall on 32 images a validation concept (the better screened
    on a tie), once every finalist is measured there; None before."""
    final = [rows.get(method=method, settings=r["settings"], seeds=FINAL["seeds"]) for r in finalists(rows, method)]
    if not final or not all(final):
        return None
    return max(final, key=lambda r: r["summary"]["overall"])


def write_preset(rows, method: str) -> Path | None:
    """erase/configs/<method>-mini.yaml from the method's choice, once its whole grid is measured: the knobs the grid
    tuned, over what the -mini preset it started from (if any) holds; None while the grid is incomplete."""
    import yaml

    if not (best := chosen(rows, method)):
        return None
    tuned = {k: v for k, v in best["settings"].items() if k not in ("config", "fill")}
    path = ROOT / "erase" / "configs" / f"{method}-mini.yaml"
    start = yaml.safe_load(path.read_text()) if path.is_file() else {"method": method}
    s = best["summary"]
    header = (f"# {method} on the miniature world, tuned: of its grid ({len(GRIDS[method])} settings) on a validation "
              f"forget set\n# ({', '.join(VALIDATION)}), the best overall on 32 images a concept among the "
              f"{FINALISTS} best screened,\n# {s['overall']:.3f} there (BENCHMARKS.md, '{SECTION}').\n")
    path.write_text(header + yaml.safe_dump({**start, **tuned}, sort_keys=False))
    return path


def section(rows) -> str:
    from .benchmarks_md import model_sentence, not_measured, section_body

    header = ("| method | setting | forgetting acc ↓ | in-kind retain ↑ | cross-kind retain ↑ | overall ↑ | paired "
              "similarity | weights edited | wall time |")
    final, screen = [header, "|---" * 9 + "|"], [header, "|---" * 9 + "|"]
    for method in METHODS:
        best = chosen(rows, method)
        ahead = [r["settings"] for r in finalists(rows, method)]
        for setting in GRIDS[method]:
            if r := rows.get(method=method, settings=setting, seeds=FINAL["seeds"]):
                star = " ★" if r is best else ""
                final.append(cells(r, method + star))
            if r := screened(rows, method, setting):
                screen.append(cells(r, f"{method}{' ◆' if setting in ahead else ''}"))
    missing = [f"{m} ({n} of {len(GRIDS[m])} settings screened)" for m in METHODS
               if (n := sum(not screened(rows, m, s) for s in GRIDS[m]))]
    missing += [f"{m} on 32 images (the finalists)" for m in METHODS if not chosen(rows, m)]
    protocol = (f"{model_sentence()} Validation forget set: {', '.join(VALIDATION)} (none of them in the methods "
                "table's forget sets). Each method's grid (at most 12 settings over its main knobs: r2 and alpha for "
                "FIA, the skill ratio for ConceptPrune, λ for UCE (its preserve list names concepts, which a preset for "
                "any forget set cannot), learning rate and steps for ESD, learning rate, saliency fraction and remap "
                "target for SalUn, learning rate and density for dynamic masks; the training methods start from their -mini "
                "presets) erases the validation set. Every setting is screened on 4 images a validation concept "
                f"(second table; {evaluation_words(SCREEN)}); the {FINALISTS} with the best overall there (◆) are "
                f"evaluated again on 32 images a concept (first table; {evaluation_words(FINAL)}) and the better "
                "overall there is the method's choice (★), its -mini preset. Columns as in the methods table; wall "
                "time is erasure only, one thread, two runs at a time on a 2-core CPU shared with other jobs. The "
                "masking methods prune to zeros, as published. Third table (where a method collapses at every "
                "setting): one knob at a time from its first row, screened as the grid (retain_weight: the weight "
                "of SalUn's denoising loss on the retained concepts' images, 0.5 in its preset; train: the layers "
                "trained, attn2 the cross-attention, unet all of them; sample_guidance: the guidance its training "
                "images are sampled at, by default the model family's, 7.5 for a Stable Diffusion UNet, where the "
                "miniature model draws at 2; remap_target: whose prediction of the anchor the forget images are "
                "remapped to, the model being trained as in SalUn's code, or the unedited model's). What they show: "
                "[docs/rationale.md](docs/rationale.md#why-salun-loses-the-other-concepts-on-the-miniature-world).")
    probes = [header, "|---" * 9 + "|"] + [cells(r, method) for method, settings in PROBES.items() for setting in settings
                                          if (r := screened(rows, method, setting))]
    return section_body(["\n".join(table) for table in (final, screen, probes) if len(table) > 2], protocol,
                        f"`{REPRODUCE}` screens the settings not yet screened on the shipped model and evaluates "
                        "the finalists not yet evaluated on 32 images (`--methods esd`: one grid; `--table`: only "
                        "rewrite this section from docs/tune-mini.json).",
                        [*rows.stale_note(REPRODUCE), *not_measured(missing)])


def cells(r: dict, name: str) -> str:
    """One row of either table."""
    s = r["summary"]
    shown = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "fill")
    return (f"| {name} | {shown} | {_ci(s, 'forgetting_accuracy')} | {_ci(s, 'retain_accuracy_in_kind')} | "
            f"{_ci(s, 'retain_accuracy_cross_kind')} | {_ci(s, 'overall')} | {s['paired_similarity']:.3f} | "
            f"{r['edited']} | {r['seconds']:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="the grids to measure (default all)")
    parser.add_argument("--table", action="store_true", help="only rewrite the section from docs/tune-mini.json")
    parser.add_argument("--probe", action="store_true", help="screen the probes of a method that collapses (PROBES)")
    parser.add_argument("--presets", action="store_true", help="write each fully measured method's choice to "
                        "erase/configs/<method>-mini.yaml (with the methods table's rerun: its rows name the presets)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .benchmarks_md import mini_model, update_section

    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; methods: {', '.join(METHODS)}")
    if args.probe:
        probe(methods, mini_model())
    elif not args.table:
        measure(methods, mini_model())
    rows = store(mini_model())
    update_section(SECTION, section(rows))
    for method in methods:
        if best := chosen(rows, method):
            print(f"{method}: {best['settings']} (overall {best['summary']['overall']:.3f} on 32 images a concept)")
        if args.presets and (path := write_preset(rows, method)):
            print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
