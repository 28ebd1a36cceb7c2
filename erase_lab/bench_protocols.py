"""The field's protocols as benchmarks: generation throughput on 1 process and on 2 (torchrun, gloo on CPU), on the
miniature model and on the SD1.5 architecture (random weights, 256 px); and the i2p protocol on the miniature
world's explicit prompts for every method.

    HF_HUB_OFFLINE=1 python -m erase_lab.bench_protocols                # throughput, both models (minutes on 2 cores)
    HF_HUB_OFFLINE=1 python -m erase_lab.bench_protocols --models mini
    HF_HUB_OFFLINE=1 python -m erase_lab.bench_protocols nudity         # every method erasing nudity, NudeNet's table

Each layout (processes × threads per process) runs the `prompts` protocol with NudeNet off (generation is what is
timed) into a fresh folder, on an erasure by UCE (closed form: seconds), and reads its report's generation record:
images made by the original and the erased model, the slowest process's wall time, images per second. Both layouts
of a model run one after the other in the same invocation, on the same machine: run it on an idle one. Writes
BENCHMARKS.md, section "Protocols: generation throughput (CPU)".

`nudity`: each method erases nudity from the miniature model with the methods table's settings, then the i2p
protocol generates the catalog's held-out nudity prompts (adults only) at seeds 0-7 and counts NudeNet's exposed
classes, original against erased. Rows land in docs/protocols-nudity-mini.json; section "Protocols: nudity on the
miniature world".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SECTION = "Protocols: generation throughput (CPU)"
NUDITY_SECTION = "Protocols: nudity on the miniature world"
NUDITY_ROWS = Path(__file__).resolve().parent.parent / "docs" / "protocols-nudity-mini.json"
NUDITY_SEEDS = list(range(8))
LAYOUTS = [(1, 2), (2, 1)]  # (processes, threads each): the machine's 2 cores either way
SETTINGS = {  # per model: prompts, sampler steps, resolution, batch size
    "mini": {"prompts": 32, "steps": 25, "resolution": None, "batch_size": 8},
    "sd15": {"prompts": 4, "steps": 10, "resolution": 256, "batch_size": 2},
}
WORDS = {"mini": "the shipped miniature model (32 px)",
         "sd15": "the SD1.5 architecture built from erase's sd15 configs with random weights (torch seed 0), 256 px"}


def pipeline(model: str):
    import erase

    if model == "mini":
        return erase.load_pipeline("mini")
    import torch

    from .bench_fia_cost import sd15_pipeline

    torch.manual_seed(0)
    return sd15_pipeline()


def child(model: str, out: Path) -> None:
    """One process under torchrun: the same erasure in every process, then its shard of the protocol's images."""
    import erase

    pipe = pipeline(model)
    result = erase.erase(pipe, ["van gogh"], method="uce", progress=False)
    s = SETTINGS[model]
    erase.evaluate_protocol(pipe, result, "prompts", out / "protocol", prompts=str(out / "prompts.txt"), nudity=False,
                            clip="mini", steps=s["steps"], resolution=s["resolution"], batch_size=s["batch_size"],
                            progress=False)  # the judge scores after the timed generation: the small one does


def launch(model: str, processes: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        (Path(out) / "prompts.txt").write_text("\n".join(f"a painting of a house, number {i}"
                                                         for i in range(SETTINGS[model]["prompts"])))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m",
                        __spec__.name, "--child", model, out], env=env, check=True)
        report = json.loads((Path(out) / "protocol" / "report.json").read_text())
    g = report["generation"]
    return {"model": model, "processes": processes, "threads": threads, "images": g["generated"], "wall_s": g["wall_s"],
            "images_per_s": g["images_per_s"], "side": report["side"], "steps": report["settings"]["steps"]}


def markdown(rows: list[dict], load: float) -> str:
    from .benchmarks_md import section_body

    lines = ["| model | processes × threads | images | wall time | images/s | over 1 process |", "|---" * 6 + "|"]
    for r in rows:
        single = next(x for x in rows if x["model"] == r["model"] and x["processes"] == 1)["images_per_s"]
        lines.append(f"| {r['model']} | {r['processes']} × {r['threads']} | {r['images']} | {r['wall_s']:.1f} s | "
                     f"{r['images_per_s']:.3g} | {r['images_per_s'] / single:.2f}x |")
    models = "; ".join(f"{m}: {WORDS[m]}, {s['prompts']} prompts × 2 models, {s['steps']} steps, batches of "
                       f"{s['batch_size']}" for m, s in SETTINGS.items() if any(r["model"] == m for r in rows))
    protocol = (f"The `prompts` protocol (NudeNet off; scored by the mini CLIP after the timed generation) on an "
                f"erasure of van gogh by UCE; {models}. Each layout is "
                "launched with torchrun (gloo between the processes), each process a contiguous share of the batches "
                "on its own threads; wall time is the slowest process's generation (model loading excluded), images "
                "both models' images. The two layouts share the machine's 2 CPU cores and ran one after the other in "
                f"one invocation (load average {load:.1f} at the start). On GPUs each process takes its own device, "
                "which this CPU table does not measure.")
    return section_body(["\n".join(lines)], protocol, "`HF_HUB_OFFLINE=1 python -m erase_lab.bench_protocols` "
                        "(`--models mini`: one model).")


def nudity_prompts(path: Path) -> Path:
    """The catalog's held-out nudity prompts (4, adults only) × NUDITY_SEEDS as an I2P file, at the mini guidance."""
    import csv

    from erase.concepts import load_catalog, parse_concepts

    from .mini_gates import MINI_GUIDANCE

    catalog = load_catalog("mini")
    prompts = catalog.eval_prompts(parse_concepts(["nudity"], catalog)[0], 4)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_number", "prompt", "evaluation_seed", "evaluation_guidance", "categories"])
        for n, (prompt, seed) in enumerate((p, s) for p in prompts for s in NUDITY_SEEDS):
            writer.writerow([n, prompt, seed, MINI_GUIDANCE, "sexual"])
    return path


def nudity_child(method: str, out: Path) -> None:
    """One method erasing nudity, then the i2p protocol on the catalog's nudity prompts; the report in `out`."""
    import erase

    from .bench_methods import METHODS

    pipe = erase.load_pipeline("mini")
    result = erase.erase(pipe, ["nudity"], method=method, progress=False, **METHODS[method])
    erase.evaluate_protocol(pipe, result, "i2p", out / "i2p", prompts=str(nudity_prompts(out / "nudity.csv")),
                            steps=25, progress=False)


def nudity_table(methods: list[str], model: str) -> str:
    """Each method not yet measured on this model, one process at a time; rows land as they finish."""
    from .bench_methods import METHODS
    from .benchmarks_md import RowStore, update_section

    store = RowStore(NUDITY_ROWS, ("method",), model)
    for method in methods:
        if store.has(method=method):
            continue
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([sys.executable, "-m", __spec__.name, "--nudity-child", method, out], check=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
            report = json.loads((Path(out) / "i2p" / "report.json").read_text())
        m = report["metrics"]
        store.put({"method": method, "settings": METHODS[method], "nudenet": m["nudenet"],
                   **{side: {k: v for k, v in m[side].items() if k != "per_image"} for side in ("original", "erased")}})
        update_section(NUDITY_SECTION, nudity_markdown(store))
    return nudity_markdown(store)


def nudity_markdown(store) -> str:
    from erase.protocols.i2p import NUDENET_CLASSES

    from .benchmarks_md import model_sentence, section_body

    names = list(NUDENET_CLASSES.values())
    lines = ["| model | " + " | ".join(names) + " | total ↓ | images with any ↓ |", "|---" * (len(names) + 3) + "|"]
    for i, r in enumerate(store.rows):
        for side in ("original",) * (i == 0) + ("erased",):
            m = r[side]
            lines.append(f"| {'unedited' if side == 'original' else r['method']}{store.mark(r)} | "
                         + " | ".join(str(m["classes"][n]) for n in names)
                         + f" | {m['total']} | {m['images_with_any']} of {m['images']} |")
    detector = store.rows[0]["nudenet"] if store.rows else {"detector": "NudeNet", "threshold": 0.6}
    silent = all(r[side]["total"] == 0 for r in store.rows for side in ("original", "erased"))
    found = ", and it detects no exposed class in them, on the unedited model either" if silent else ""
    protocol = (f"{model_sentence()} Each method erases nudity with the methods table's settings; the i2p protocol "
                "then generates the catalog's 4 held-out nudity prompts (adults only) × seeds 0–7 at guidance 2, 25 "
                f"steps, with the original and the erased model, and {detector['detector']} counts, at threshold "
                f"{detector['threshold']}, the images in which it detects each exposed class. What the numbers mean "
                "here: the miniature world draws nudity as abstract adult figures at 32 px, far from the photographs "
                f"NudeNet was trained on{found}; the table shows the protocol running end to end on every method's "
                "erasure, not how well each erases nudity (the methods table measures that with the world's own "
                "judge).")
    return section_body(["\n".join(lines)], protocol,
                        "`HF_HUB_OFFLINE=1 python -m erase_lab.bench_protocols nudity` measures the methods not yet "
                        "measured on the shipped model.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", nargs="?", default="throughput", choices=["throughput", "nudity"])
    p.add_argument("--models", default=",".join(SETTINGS), help="throughput: the models (default mini,sd15)")
    p.add_argument("--methods", help="nudity: the methods (default all of the methods table's)")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--nudity-child", nargs=2, metavar=("METHOD", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]))
    if args.nudity_child:
        return nudity_child(args.nudity_child[0], Path(args.nudity_child[1]))
    from .benchmarks_md import mini_model, update_section

    if args.part == "nudity":
        from .bench_methods import METHODS

        return print(nudity_table(args.methods.split(",") if args.methods else list(METHODS), mini_model()))

    models = args.models.split(",")
    if unknown := set(models) - set(SETTINGS):
        raise SystemExit(f"--models: unknown {sorted(unknown)}; models: {', '.join(SETTINGS)}")
    load = os.getloadavg()[0]
    rows = []
    for model in models:
        for processes, threads in LAYOUTS:
            rows.append(launch(model, processes, threads))
            print(rows[-1], flush=True)
    update_section(SECTION, markdown(rows, load))
    print(markdown(rows, load))


if __name__ == "__main__":
    main()
