"""Protocol generation throughput: images per second of one protocol run on 1 process and on 2 (torchrun, gloo on
CPU), on the miniature model and on the SD1.5 architecture (random weights, 256 px).

    HF_HUB_OFFLINE=1 python -m erase_lab.bench_protocols                # both models (minutes on 2 cores)
    HF_HUB_OFFLINE=1 python -m erase_lab.bench_protocols --models mini

Each layout (processes × threads per process) runs the `prompts` protocol with NudeNet off (generation is what is
timed) into a fresh folder, on an erasure by UCE (closed form: seconds), and reads its report's generation record:
images made by the original and the erased model, the slowest process's wall time, images per second. Both layouts
of a model run one after the other in the same invocation, on the same machine: run it on an idle one. Writes
BENCHMARKS.md, section "Protocols: generation throughput (CPU)".
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
                            steps=s["steps"], resolution=s["resolution"], batch_size=s["batch_size"], progress=False)


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
                     f"{r['images_per_s']:.2f} | {r['images_per_s'] / single:.2f}x |")
    models = "; ".join(f"{m}: {WORDS[m]}, {s['prompts']} prompts × 2 models, {s['steps']} steps, batches of "
                       f"{s['batch_size']}" for m, s in SETTINGS.items() if any(r["model"] == m for r in rows))
    protocol = (f"The `prompts` protocol (NudeNet off) on an erasure of van gogh by UCE; {models}. Each layout is "
                "launched with torchrun (gloo between the processes), each process a contiguous share of the batches "
                "on its own threads; wall time is the slowest process's generation (model loading excluded), images "
                "both models' images. The two layouts share the machine's 2 CPU cores and ran one after the other in "
                f"one invocation (load average {load:.1f} at the start). On GPUs each process takes its own device, "
                "so N processes there approach N times one.")
    return section_body(["\n".join(lines)], protocol, "`HF_HUB_OFFLINE=1 python -m erase_lab.bench_protocols` "
                        "(`--models mini`: one model).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(SETTINGS))
    p.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]))
    from .benchmarks_md import update_section

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
