"""FIA across processes: the 10 Imagenette classes erased from the mini model by 1 and by 2 processes.

    HF_HUB_OFFLINE=1 python -m erase_lab.bench_fia_processes

Each configuration (processes x threads per process) is launched with torchrun and times erase() in every process
(capture, scoring, the all-reduce of the votes and the fusion); the wall time is the slowest process's. Run it on
an idle machine: the rows share its cores. Writes BENCHMARKS.md, section "FIA across processes".
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

SECTION = "FIA across processes (mini model, 10 concepts, CPU)"
LAYOUTS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads each)


def child(out: Path) -> None:
    """One process under torchrun: erase the ten classes, write its timing."""
    import torch

    import erase
    from erase.mini import world

    pipe = erase.load_pipeline("mini")
    started = time.perf_counter()
    result = erase.erase(pipe, list(world.TAUGHT_OBJECTS), config="fia-object", progress=False)
    seconds = time.perf_counter() - started
    rank = os.environ.get("RANK", "0")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "seconds": seconds, "threads": torch.get_num_threads(), "edited": result.record["totals"]["edited"],
        "processes": result.record.get("processes", 1), **result.record["timings"]}))


def launch(processes: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", __spec__.name,
                        "--child", out], env=env, check=True)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    return {"processes": processes, "threads": threads, "seconds": max(r["seconds"] for r in ranks),
            "edited": {r["edited"] for r in ranks}, "capture_s": ranks[0]["capture_s"]}


def markdown(rows: list[dict]) -> str:
    from .benchmarks_md import section_body

    single = next(r for r in rows if (r["processes"], r["threads"]) == (1, 1))["seconds"]
    lines = ["| processes × threads | erase() wall time | speed-up over 1 × 1 | weights pruned |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['processes']} × {r['threads']} | {r['seconds']:.1f} s | {single / r['seconds']:.2f}x | "
                     f"{', '.join(map(str, sorted(r['edited'])))} |")
    return section_body(["\n".join(lines)], protocol(os.getloadavg()[0]),
                        "`HF_HUB_OFFLINE=1 python -m erase_lab.bench_fia_processes` (on an idle machine).")


def protocol(load: float) -> str:
    """How the rows were measured; `load`: the 1-minute load average at the end."""
    from .benchmarks_md import model_sentence

    return (f"{model_sentence()} The 10 Imagenette classes with `--config fia-object`; each process captures a "
            "contiguous share of the concepts (and their base prompts), the votes are all-reduced and every process "
            "fuses the same masks (the pruned count is the same in every process and layout). Wall time is erase() in "
            f"the slowest process, model loading excluded. 2-core CPU; 1-minute load average {load:.1f} at the end.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    from .benchmarks_md import update_section

    rows = [launch(*layout) for layout in LAYOUTS]
    text = markdown(rows)
    print(text)
    update_section(SECTION, text)


if __name__ == "__main__":
    main()
