"""FIA scoring cost on the real SD1.5 architecture (random weights, CPU): UNet calls, time, memory, patch size.

    python scripts/bench_fia_cost.py [--resolution 256] [--pairs 2]

Each measurement runs in its own process, so that peak RSS belongs to that measurement alone:
  plain  — the bare UNet forwards FIA needs (same batches, same number of calls), no hooks, no statistics;
  fia    — erase() for one concept (capture, saliency, fusion), then result.save() for the patch size.
Prints the numbers and writes them to BENCHMARKS.md (section "FIA scoring cost").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
SECTION = "FIA scoring cost (SD1.5 architecture, random weights, CPU)"
CONCEPT = "church"


def sd15_pipeline():
    """SD1.5 built from the shipped configs with random weights (no download)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import erase
    from erase.models import SINGLE_FILE_CONFIGS

    root = SINGLE_FILE_CONFIGS / "sd15"
    read = lambda part, name="config.json": json.loads((root / part / name).read_text())  # noqa: E731
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(read("unet")), vae=AutoencoderKL.from_config(read("vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**read("text_encoder"))), tokenizer=erase.clip_tokenizer(),
        scheduler=PNDMScheduler.from_config(read("scheduler", "scheduler_config.json")), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def bare_forwards(pipe, resolution: int, pairs: int) -> float:
    """Seconds for the UNet calls FIA makes (same batches, same count), without hooks or statistics."""
    from erase.capture import CaptureSettings, denoise_first_calls
    from erase.concepts import load_catalog, parse_concepts

    catalog = load_catalog()
    prompt_pairs = catalog.prompt_pairs(parse_concepts(CONCEPT, catalog)[0], pairs)
    settings = CaptureSettings(resolution=resolution, batch_size=pairs)
    started = time.perf_counter()
    for prompts in ([p for p, _ in prompt_pairs], [b for _, b in prompt_pairs]):
        denoise_first_calls(pipe, prompts, settings)
    return time.perf_counter() - started


def measure(mode: str, resolution: int, pairs: int) -> dict:
    """plain: peak RSS and time of the bare forwards. fia: erase() and save(), then the bare forwards again in
    the same process, so that both times see the same machine load."""
    import erase

    pipe = sd15_pipeline()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if mode == "plain":
        return {"bare_s": bare_forwards(pipe, resolution, pairs), "rss_loaded_mb": rss_loaded,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    result = erase.erase(pipe, CONCEPT, progress=False, resolution=resolution, prompts_per_concept=pairs,
                         batch_size=pairs)
    handle.remove()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        saved = result.save(Path(tmp) / "run")
        patch = (saved / "patch.safetensors").stat().st_size
        unet_file = (saved / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    timings = result.record["timings"]
    return {"capture_s": timings["capture_s"], "scoring_s": timings["scoring_s"],
            "fingerprint_s": timings["fingerprint_s"], "bare_s": bare_forwards(pipe, resolution, pairs),
            "unet_calls": len(calls), "peak_rss_mb": peak, "patch_bytes": patch, "unet_file_bytes": unet_file,
            "edited": result.record["totals"]["edited"]}


def run_in_subprocess(mode: str, resolution: int, pairs: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", mode, "--resolution", str(resolution),
                           "--pairs", str(pairs)], capture_output=True, text=True, check=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(plain: dict, fia: dict, resolution: int, pairs: int) -> str:
    full_calls = 51  # PNDM, 50 steps: 51 UNet calls per prompt batch
    batches = fia["unet_calls"] // 10
    fia_time = fia["capture_s"] + fia["scoring_s"]
    rows = [
        ("UNet calls (both prompt sets)", f"{fia['unet_calls']}", f"{full_calls * batches} for full 50-step "
         f"generations of the same batches ({fia['unet_calls'] / (full_calls * batches):.2f}x)", "stop after T"),
        ("FIA time / bare UNet forwards", f"{fia_time:.1f} s / {fia['bare_s']:.1f} s",
         f"{fia_time / fia['bare_s']:.3f}x", "<= 1.15x"),
        ("  of which saliency + masks", f"{fia['scoring_s']:.2f} s", "", ""),
        ("  base fingerprint (sha256 of the UNet)", f"{fia['fingerprint_s']:.2f} s", "", "not in the ratio"),
        ("peak RSS: FIA / plain inference", f"{fia['peak_rss_mb']:.0f} MB / {plain['peak_rss_mb']:.0f} MB",
         f"{fia['peak_rss_mb'] / plain['peak_rss_mb']:.3f}x", "<= 1.3x"),
        ("patch.safetensors / unet file", f"{fia['patch_bytes'] / 2**20:.2f} MB / {fia['unet_file_bytes'] / 2**20:.0f} MB",
         f"{100 * fia['patch_bytes'] / fia['unet_file_bytes']:.3f}%", "<= 1%"),
    ]
    lines = ["| measure | value | ratio | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines.append("")
    lines.append(f"Settings: concept '{CONCEPT}', {pairs} prompt pairs in one batch each, T = 10 UNet calls, CFG 7.5, "
                 f"{resolution} px, fp32, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
                 f"1-minute load average {os.getloadavg()[0]:.1f} at the end. "
                 f"Pruned {fia['edited']} weights. Plain inference = the same UNet calls without hooks "
                 f"(peak RSS includes the loaded pipeline: {plain['rss_loaded_mb']:.0f} MB after loading); "
                 f"the bare forwards are timed in the FIA process right after erase(), so both see the same machine load.")
    lines.append(f"Reproduce: `python scripts/bench_fia_cost.py --resolution {resolution} --pairs {pairs}`")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--child", choices=["plain", "fia"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.resolution, args.pairs)))
        return
    plain = run_in_subprocess("plain", args.resolution, args.pairs)
    fia = run_in_subprocess("fia", args.resolution, args.pairs)
    text = report(plain, fia, args.resolution, args.pairs)
    print(text)
    from benchmarks_md import update_section

    update_section(SECTION, text)


if __name__ == "__main__":
    main()
