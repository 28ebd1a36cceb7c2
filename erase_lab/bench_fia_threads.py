"""FIA's statistics and masks on two CPU threads and on one, idle and beside a competing process (SD1.5 architecture).

    python -m erase_lab.bench_fia_threads [--repeats 3]

The evidence for CaptureSettings.statistics_threads (default 1: FIA's statistics and masks on one CPU thread while
the UNet keeps torch's count): both are memory-bound element-wise work and selections, and on a busy machine each
op on several threads waits at OpenMP's barrier for a descheduled one. Measured in one process, both settings under
the same load:
  statistics — what the capture's hooks do per UNet call: column norms of the 16 ff.net.2 inputs of one real
               UNet call (256 px, 2 prompt pairs, CFG) and their streaming update;
  masks      — one concept's FIA masks (T = 10, r1 0.03, r2 0.01) and their noise fill over the 16 ff.net.2 weights,
               from statistics drawn at random (30% of the columns excited: about as many weights as a real run masks).
Writes the section "FIA statistics: threads" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import torch

SECTION = "FIA statistics: threads (SD1.5 architecture, random weights, CPU)"
STEPS = 10


def ffn_inputs(pipe, layers) -> dict[str, torch.Tensor]:
    """The inputs of the target layers in the first UNet call of a capture (256 px, 2 prompt pairs)."""
    from erase.capture import CaptureSettings, capture

    inputs = {}
    handles = [layer.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, a[0]))
               for name, layer in layers.items()]
    try:
        capture(pipe, ["a photo of a church", "a photo of a church in a forest"], layers,
                CaptureSettings(resolution=256, batch_size=2, saliency_steps=1), progress=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def random_stats(layers, excited: float, seed: int):
    """Statistics of 2 prompts over T steps: uniform in [0, 1), plus 0.5 in a random `excited` share of the columns."""
    from erase.capture import ColumnStats

    generator = torch.Generator().manual_seed(seed)
    stats = ColumnStats()
    for name, layer in layers.items():
        shift = 0.5 * (torch.rand(layer.in_features, generator=generator) < excited)
        for t in range(STEPS):
            stats.add(name, t, STEPS, torch.rand(2, layer.in_features, generator=generator) + shift)
    stats.count = 2
    return stats


def timed(work, one_thread: bool, repeats: int) -> float:
    """Mean seconds of work() on torch's two threads, or on one as statistics_threads=1 runs it."""
    from erase.capture import cpu_threads

    torch.set_num_threads(2)
    work()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        with cpu_threads(torch.device("cpu"), 1 if one_thread else None):
            work()
    return (time.perf_counter() - started) / repeats


def workloads(pipe) -> dict:
    """The two pieces of work, as callables: the statistics of one UNet call, one concept's masks and fill."""
    from erase.capture import ColumnStats, column_norms
    from erase.families import find_target_layers
    from erase.saliency import fia_concept_mask, noise_fill

    layers = find_target_layers(pipe.unet, "*ff.net.2")
    inputs = ffn_inputs(pipe, layers)
    concept, base = random_stats(layers, 0.3, seed=0), random_stats(layers, 0.0, seed=1)
    weights = {f"{name}.weight": layer.weight for name, layer in layers.items()}

    def statistics():
        stats = ColumnStats()
        for name, x in inputs.items():
            stats.add(name, 0, 1, column_norms(x, 2))

    def masks() -> int:
        masks = fia_concept_mask(layers, concept, base, r1=0.03, r2=0.01)
        noise_fill(weights, {f"{name}.weight": m for name, m in masks.items()}, seed=0)
        return sum(int(m.sum()) for m in masks.values())

    return {"statistics": statistics, "masks": masks}


def measure(works: dict, repeats: int) -> dict[str, float]:
    return {f"{name}, {threads}": timed(work, threads == 1, repeats) for name, work in works.items() for threads in (2, 1)}


def cell(seconds: float, work: str) -> str:
    return f"{1000 * seconds:.0f} ms" if work == "statistics" else f"{seconds:.2f} s"


def report(idle: dict, loaded: dict, repeats: int, masked: int, commit: str) -> str:
    from .benchmarks_md import section_body

    lines = ["| work | idle: 2 threads | idle: 1 thread | beside a competing process: 2 threads | 1 thread |",
             "|---|---|---|---|---|"]
    for work, label in (("statistics", "statistics of one UNet call (16 ff.net.2 inputs)"),
                        ("masks", "one concept's masks and noise fill (16 ff.net.2 weights, T = 10)")):
        values = [run[f"{work}, {threads}"] for run in (idle, loaded) for threads in (2, 1)]
        lines.append(f"| {label} | " + " | ".join(cell(v, work) for v in values) + " |")
    measured = f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, commit {commit}"
    return section_body(["\n".join(lines)], protocol(repeats, masked, measured),
                        "`python -m erase_lab.bench_fia_threads` (its idle columns on an otherwise idle machine).")


def protocol(repeats: int, masked: int, measured: str) -> str:
    """How the cells were measured; `measured`: torch's version, the date and the commit."""
    from .bench_fia_cost import MODEL_WORDS

    return (f"Model: {MODEL_WORDS}, on a CPU. Each cell: the mean of {repeats} repetitions after a "
            "warm-up, in one process; '1 thread' runs inside erase.capture.cpu_threads, as erase() does with its default "
            "statistics_threads=1; the competing process is one one-thread matrix product (the FIA scoring cost's load "
            f"process). {measured}. Statistics: the 16 ff.net.2 inputs of one real UNet call (256 px, 2 prompt pairs "
            f"with CFG); masks: statistics drawn at random with 30% of the columns excited, {masked:,} weights masked.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from .bench_fia_cost import commit, sd15_pipeline, under_load
    from .benchmarks_md import update_section

    works = workloads(sd15_pipeline())
    idle = measure(works, args.repeats)
    loaded = under_load(1, lambda: measure(works, args.repeats))
    text = report(idle, loaded, args.repeats, works["masks"](), commit())
    print(text)
    update_section(SECTION, text)


if __name__ == "__main__":
    main()
