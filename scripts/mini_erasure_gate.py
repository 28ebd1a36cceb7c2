"""The miniature world's erasure gate: erasing one shape must drop its accuracy below 20% while every other
shape keeps at least 80% of its original accuracy. Prints the table and records it in BENCHMARKS.md
("Miniature world: erasure gate").

    HF_HUB_OFFLINE=1 python scripts/mini_erasure_gate.py [--shape circle] [--prompts 6]
    HF_HUB_OFFLINE=1 python scripts/mini_erasure_gate.py --ablation     # zero whole layers: where shapes live

Each row is one method configuration; evaluation uses erase.evaluate with the mini CLIP (held-out prompts,
paired seeds, 25 steps, guidance 4).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
SECTION = "Miniature world: erasure gate"
CONFIGS = [  # (method, settings): the defaults first, then what was tried to make the mini model forget
    ("fia", {}),
    ("fia", {"r2": 0.1}),
    ("fia", {"r2": 0.2, "target": "*attn2.to_out.0"}),
    ("fia", {"r2": 0.3, "target": "*attn2.to_[kv]"}),
    ("conceptprune", {}),
    ("uce", {}),
    ("esd", {"config": "esd-mini"}),
    ("salun", {"config": "salun-mini"}),
    ("dynamic", {"config": "dynamic-mini"}),
]


def run(shape: str, prompts: int) -> list[dict]:
    import erase
    from erase.mini import world

    pipe = erase.load_pipeline("mini")
    others = [s for s in world.SHAPES if s != shape]
    rows = []
    for method, settings in CONFIGS:
        started = time.perf_counter()
        result = erase.erase(pipe, shape, method=method, progress=False, **settings)
        report = erase.evaluate(pipe, result, retain=others, progress=False, prompts_per_concept=prompts,
                                guidance_scale=4.0, seeds=[0])
        forget = report.metrics["forget"][shape]
        kept = {name: v["erased"] / v["original"] for name, v in report.metrics["retain"].items() if v["original"] > 0}
        rows.append({"method": method, "settings": settings, "edited": result.record["totals"]["edited"],
                     "before": forget["original"], "after": forget["erased"], "worst_kept": min(kept.values()),
                     "similarity": report.metrics["fidelity"]["paired_similarity"],
                     "seconds": time.perf_counter() - started})
    return rows


def table(rows: list[dict], shape: str, prompts: int) -> str:
    lines = ["| method | settings | weights edited | accuracy before → after | worst other shape kept | "
             "paired similarity | pass |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r["after"] < 0.2 and r["worst_kept"] >= 0.8
        lines.append(f"| {r['method']} | {r['settings'] or 'defaults'} | {r['edited']} | {r['before']:.0%} → "
                     f"{r['after']:.0%} | {r['worst_kept']:.0%} | {r['similarity']:.3f} | {'yes' if ok else 'NO'} |")
    lines += ["", f"Erasing '{shape}'; {prompts} held-out prompts per shape, seed 0, 25 steps, guidance 4, mini CLIP "
              "judge; 'kept' = erased accuracy / original accuracy of each other shape.",
              "Reproduce: `HF_HUB_OFFLINE=1 python scripts/mini_erasure_gate.py`"]
    return "\n".join(lines)


ABLATIONS = ["*ff.net.2", "*attn2.to_out.0", "down_blocks.1.*attn2.to_out.0", "*ff.net.*"]


def ablation(prompts: int) -> str:
    """Where the shapes live: per-shape accuracy with every weight of some layers zeroed (an edit that prunes
    them whole), on prompts 'a {shape}'. An FFN-only mask cannot erase what survives zeroing every FFN."""
    import fnmatch

    import torch

    import erase
    from erase.edits import MaskEdit
    from erase.mini import world
    from erase.mini.clip import load_mini_clip, zero_shot

    pipe, judge = erase.load_pipeline("mini"), load_mini_clip()
    texts = [f"a {shape}" for shape in world.SHAPES for _ in range(prompts)]

    def accuracy() -> list[float]:
        images = pipe(texts, num_inference_steps=25, guidance_scale=4.0, output_type="pil",
                      generator=[torch.Generator().manual_seed(i) for i in range(len(texts))]).images
        seen = [a.shape for a in zero_shot(*judge, images)]
        return [sum(s == shape for s in seen[i * prompts:(i + 1) * prompts]) / prompts
                for i, shape in enumerate(world.SHAPES)]

    lines = ["| zeroed | weights | " + " | ".join(world.SHAPES) + " |", "|---" * (len(world.SHAPES) + 2) + "|"]
    lines.append("| nothing | 0 | " + " | ".join(f"{a:.0%}" for a in accuracy()) + " |")
    for pattern in ABLATIONS:
        masks = {f"{n}.weight": torch.ones_like(m.weight, dtype=torch.bool) for n, m in pipe.unet.named_modules()
                 if isinstance(m, torch.nn.Linear) and fnmatch.fnmatch(n, pattern)}
        with MaskEdit(masks).applied_to(pipe.unet):
            row = accuracy()
        lines.append(f"| `{pattern}` | {sum(m.numel() for m in masks.values())} | "
                     + " | ".join(f"{a:.0%}" for a in row) + " |")
    lines += ["", f"'a {{shape}}', {prompts} seeds per shape, 25 steps, guidance 4, mini CLIP judge; biases kept.",
              "Reproduce: `HF_HUB_OFFLINE=1 python scripts/mini_erasure_gate.py --ablation`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="circle")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--ablation", action="store_true", help="zero whole layers instead (where shapes live)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks_md import update_section

    if args.ablation:
        text = ablation(args.prompts)
        print(text)
        update_section("Miniature world: where the shapes live", text)
        return
    text = table(run(args.shape, args.prompts), args.shape, args.prompts)
    print(text)
    update_section(SECTION, text)


if __name__ == "__main__":
    main()
