"""FIA scoring cost on a real architecture (random weights, CPU): denoiser calls, time, memory, patch size.

    python -m erase_lab.bench_fia_cost [--arch sd15|sd3-medium] [--resolution 256] [--pairs 2] [--calls 10] [--load 2]

--arch: SD1.5 (a UNet) or SD3-medium (an MMDiT, without T5 as users run it to save memory), built from erase's
shipped configs with random weights. Each measurement runs in its own process, so that peak RSS belongs to that
measurement alone:
  plain  — the bare denoiser forwards FIA needs (same batches, same number of calls), no hooks, no statistics;
  fia    — erase() for one concept (capture, saliency, fusion), then result.save() for the patch size.
The FIA measurement runs twice: on the machine as it is (idle) and beside --load competing processes (loaded).
Each run lands in docs/fia-cost[-ARCH].json as it ends (a stopped bench keeps the runs it finished; a rerun with the
same settings measures only the missing ones, --fresh all of them; --table measures none and rewrites the section
from them). Prints the numbers and writes them to BENCHMARKS.md (section "FIA scoring cost (... architecture ...)").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
CONCEPT = "church"


def arch_settings(arch: str) -> dict:
    """What names and stamps an architecture's runs: its section, row file, stamp and words, and its denoiser's calls
    in a full 50-step generation (PNDM: 51 UNet calls; flow matching: 50)."""
    if arch == "sd15":
        return {"section": "FIA scoring cost (SD1.5 architecture, random weights, CPU)", "rows": DOCS / "fia-cost.json",
                "model": "sd15 config, random weights (torch seed 0)", "denoiser": "UNet", "full_calls": 51,
                "words": "the SD1.5 architecture built from erase's sd15 configs with random weights (torch seed 0)"}
    return {"section": "FIA scoring cost (SD3-medium architecture, random weights, CPU)",
            "rows": DOCS / "fia-cost-sd3-medium.json", "model": "sd3-medium config, random weights (torch seed 0)",
            "denoiser": "transformer", "full_calls": 50,
            "words": "the SD3-medium architecture (MMDiT, 2B parameters; CLIP-L and CLIP-G, no T5) built from erase's "
                     "sd3-medium configs with random weights (torch seed 0)"}


def build_pipeline(arch: str):
    return sd15_pipeline() if arch == "sd15" else sd3_medium_pipeline()


def sd3_medium_pipeline():
    """SD3-medium built from the shipped configs with random weights, without T5 (no download)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    import erase
    from erase.models import SINGLE_FILE_CONFIGS

    root = SINGLE_FILE_CONFIGS / "sd3-medium"
    read = lambda part, name="config.json": json.loads((root / part / name).read_text())
    torch.manual_seed(0)
    encoders = {name: CLIPTextModelWithProjection(CLIPTextConfig(**read(name))) for name in ("text_encoder", "text_encoder_2")}
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_config(read("transformer")), vae=AutoencoderKL.from_config(read("vae")),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(read("scheduler", "scheduler_config.json")),
        tokenizer=erase.clip_tokenizer(), tokenizer_2=erase.clip_tokenizer(), text_encoder_3=None, tokenizer_3=None,
        **encoders)


def sd15_pipeline():
    """SD1.5 built from the shipped configs with random weights (no download)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import erase
    from erase.models import SINGLE_FILE_CONFIGS

    root = SINGLE_FILE_CONFIGS / "sd15"
    read = lambda part, name="config.json": json.loads((root / part / name).read_text())
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(read("unet")), vae=AutoencoderKL.from_config(read("vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**read("text_encoder"))), tokenizer=erase.clip_tokenizer(),
        scheduler=PNDMScheduler.from_config(read("scheduler", "scheduler_config.json")), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def bare_forwards(pipe, resolution: int, pairs: int, saliency_steps: int) -> float:
    """Seconds for the denoiser calls FIA makes (same batches, same count, the same loop), without hooks or
    statistics."""
    from erase.capture import CaptureSettings, first_calls
    from erase.concepts import load_catalog, parse_concepts

    catalog = load_catalog()
    prompt_pairs = catalog.prompt_pairs(parse_concepts(CONCEPT, catalog)[0], pairs)
    settings = CaptureSettings(resolution=resolution, batch_size=pairs, saliency_steps=saliency_steps)
    started = time.perf_counter()
    for prompts in ([p for p, _ in prompt_pairs], [b for _, b in prompt_pairs]):
        first_calls(pipe, prompts, settings)
    return time.perf_counter() - started


def measure(mode: str, arch: str, resolution: int, pairs: int, saliency_steps: int) -> dict:
    """plain: peak RSS and time of the bare forwards. fia: after a warm-up call (the first denoiser calls of a process
    are slower: allocator, kernels), the bare forwards, erase() and the bare forwards again in the same process, so
    that both sides see the same machine load; then save() for the patch size."""
    import erase
    from erase.families import family_of

    pipe = build_pipeline(arch)
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if mode == "plain":
        return {"bare_s": bare_forwards(pipe, resolution, pairs, saliency_steps), "rss_loaded_mb": rss_loaded,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    bare_forwards(pipe, resolution, pairs, 1)
    bare_before = bare_forwards(pipe, resolution, pairs, saliency_steps)
    calls = []
    handle = denoiser.register_forward_hook(lambda *_: calls.append(1))
    result = erase.erase(pipe, CONCEPT, progress=False, resolution=resolution, prompts_per_concept=pairs,
                         batch_size=pairs, saliency_steps=saliency_steps)
    handle.remove()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        saved = result.save(Path(tmp) / "run", single_file=False)
        patch = (saved / "patch.safetensors").stat().st_size
        unet_file = (saved / family.attribute / "diffusion_pytorch_model.safetensors").stat().st_size
    timings = result.record["timings"]
    return {"capture_s": timings["capture_s"], "scoring_s": timings["scoring_s"],
            "fingerprint_s": timings["fingerprint_s"],
            "bare_s": [bare_before, bare_forwards(pipe, resolution, pairs, saliency_steps)],
            "unet_calls": len(calls), "peak_rss_mb": peak, "patch_bytes": patch, "unet_file_bytes": unet_file,
            "edited": result.record["totals"]["edited"], "fill": result.config.fill,
            "statistics_threads": result.config.statistics_threads}


def run_in_subprocess(mode: str, args) -> dict:
    done = subprocess.run([sys.executable, "-m", __spec__.name, "--child", mode, "--arch", args.arch, "--resolution",
                           str(args.resolution), "--pairs", str(args.pairs), "--calls", str(args.calls)],
                          capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).parent)
    return done.stdout.strip() or "unknown"


def run_key(run: str, args) -> dict:
    """What identifies the row of `run` at these settings."""
    key = {"run": run, "resolution": args.resolution, "pairs": args.pairs, "load": args.load if run == "loaded" else 0}
    # The SD1.5 rows measured before --calls existed all used T = 10: their key has no calls field.
    return key if args.arch == "sd15" and args.calls == 10 else {**key, "calls": args.calls}


def measured(store, run: str, args, measure_it) -> dict:
    """The row of `run` for these settings: kept from an earlier bench unless --fresh, else measured now and kept."""
    key = run_key(run, args)
    if not args.fresh and (row := store.get(**key)):
        return row
    row = {**key, **measure_it(), "load_average": os.getloadavg()[0], "commit": commit(),
           "date": time.strftime("%Y-%m-%d"), "beside": args.beside if run == "loaded" else ""}
    store.put(row)
    return row


def kept(store, run: str, args, _measure_it) -> dict:
    """--table: the row of `run` for these settings as kept, measuring nothing."""
    key = run_key(run, args)
    if not (row := store.get(**key)):
        raise SystemExit(f"--table: {store.path.name} has no {run} run for {key}; measure it without --table")
    return row


LOAD = "import torch; torch.set_num_threads(1); a = torch.randn(1024, 1024)\nwhile True: a @ a"


def under_load(processes: int, measure_it):
    """measure_it() while `processes` one-thread matrix products compete for the CPU (a loaded machine, reproducibly)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped bench stops its load too (finally below)
    hogs = [subprocess.Popen([sys.executable, "-c", LOAD]) for _ in range(processes)]
    try:
        return measure_it()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def overhead(fia: dict) -> tuple[float, float]:
    """(FIA time, its bare forwards: the mean of the timings before and after erase())."""
    return fia["capture_s"] + fia["scoring_s"], sum(fia["bare_s"]) / len(fia["bare_s"])


def other_settings(store, args) -> str:
    """A sentence on the idle runs kept at other settings, so that a table at one setting hides none of them."""
    key = store.identity(run_key("idle", args))
    others = [r for r in store.rows if r["run"] == "idle" and store.current(r) and store.identity(r) != key]
    if not others:
        return ""
    ratio = lambda r: overhead(r)[0] / overhead(r)[1]
    return " Kept at other settings: " + "; ".join(
        f"T = {r.get('calls', 10)}, {r['pairs']} prompt pairs, {r['resolution']} px: {ratio(r):.3f}x "
        f"(scoring {r['scoring_s']:.1f} s, commit {r['commit']})" for r in others) + "."


def report(plain: dict, runs: dict[str, dict], args, store=None) -> str:
    from .benchmarks_md import section_body

    resolution, pairs, load, arch = args.resolution, args.pairs, args.load, arch_settings(args.arch)
    full_calls, denoiser = arch["full_calls"], arch["denoiser"]
    fia = runs["idle"]
    batches = fia["unet_calls"] // args.calls
    cells = lambda f: " | ".join(f(run) for run in runs.values())
    rows = [
        (f"{denoiser} calls (both prompt sets)", cells(lambda r: f"{r['unet_calls']} ({r['unet_calls'] / (full_calls * batches):.2f}x "
                                                                 f"of {full_calls * batches} for full 50-step generations)"),
         "stop after T"),
        (f"FIA time / bare {denoiser} forwards", cells(lambda r: "{:.1f} s / {:.1f} s = **{:.3f}x**".format(
            *overhead(r), overhead(r)[0] / overhead(r)[1])), "<= 1.10x"),
        ("  overhead: FIA time − bare forwards", cells(lambda r: f"{overhead(r)[0] - overhead(r)[1]:.1f} s"), ""),
        ("  of which saliency, masks, fusion, fill", cells(lambda r: f"{r['scoring_s']:.2f} s"), ""),
        ("  bare forwards before / after erase()", cells(lambda r: f"{r['bare_s'][0]:.1f} s / {r['bare_s'][1]:.1f} s"),
         ""),
        (f"  base fingerprint (sha256 of the {denoiser})", cells(lambda r: f"{r['fingerprint_s']:.2f} s"), "not in the ratio"),
        ("measured (date, commit)", cells(lambda r: f"{r['date']}, {r['commit']}"), ""),
        ("peak RSS: FIA / plain inference", cells(lambda r: f"{r['peak_rss_mb']:.0f} MB / {plain['peak_rss_mb']:.0f} MB "
                                                            f"({r['peak_rss_mb'] / plain['peak_rss_mb']:.3f}x)"), "<= 1.3x"),
        (f"patch.safetensors / {denoiser.lower()} file", cells(lambda r: f"{r['patch_bytes'] / 2**20:.2f} MB / "
                                                          f"{r['unet_file_bytes'] / 2**20:.0f} MB "
                                                          f"({100 * r['patch_bytes'] / r['unet_file_bytes']:.3f}%)"), "<= 1%"),
    ]
    lines = [f"| measure | {' | '.join(runs)} | target |", "|---" * (len(runs) + 2) + "|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    spread = ", ".join(f"{run} {100 * abs(r['bare_s'][0] - r['bare_s'][1]) / overhead(r)[1]:.0f}%" for run, r in runs.items())
    guidance = "CFG 7.5" if args.arch == "sd15" else "CFG 7, flow matching, the pipeline's own loop"
    protocol = (f"Model: {arch['words']}, on a CPU. Settings: concept '{CONCEPT}', {pairs} prompt pairs in one batch "
                f"each, T = {args.calls} {denoiser} calls, {guidance}, {resolution} px, fp32, {fia['threads']} CPU threads (statistics and masks: "
                f"{fia['statistics_threads'] or fia['threads']}, statistics_threads), torch {fia['torch']}; fill "
                f"{fia['fill']}, {fia['edited']} weights masked. idle: nothing else running (1-minute load average "
                f"{runs['idle']['load_average']:.1f} at its end)"
                + (f"; loaded: {load} one-thread matrix-product processes running beside it"
                   + (f" and {runs['loaded']['beside']}" if runs["loaded"]["beside"] else "")
                   + f" (load average {runs['loaded']['load_average']:.1f})" if "loaded" in runs else "") + ". In each "
                f"run a warm-up {denoiser} call comes first, then the bare forwards (the same calls without hooks), "
                "erase() and the bare forwards again in the same process, so both sides see the same load; the ratio "
                "uses their mean. Plain inference: the bare forwards in a process of their own, for its peak RSS (the "
                f"loaded pipeline alone: {plain['rss_loaded_mb']:.0f} MB). Noise: the bare forwards before and after "
                f"erase() differ by {spread} of their mean in these runs; one run per setting reads the ratio to about "
                "that precision." + (other_settings(store, args) if store else ""))
    options = "" if args.arch == "sd15" else f"--arch {args.arch} "
    options += "" if args.calls == 10 else f"--calls {args.calls} "
    reproduce = (f"`python -m erase_lab.bench_fia_cost {options}--resolution {resolution} --pairs {pairs} --load {load}` "
                 f"measures the runs not yet in docs/{arch['rows'].name} (`--fresh`: all of them; `--table`: only "
                 "rewrite this section from the runs kept).")
    return section_body(["\n".join(lines)], protocol, reproduce)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["sd15", "sd3-medium"], default="sd15")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--calls", type=int, default=10, help="T: denoiser calls captured per prompt batch")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--load", type=int, default=2, help="competing one-thread processes in the loaded run (0: no such run)")
    p.add_argument("--beside", default="", help="what else ran on the machine during the loaded run (for the record)")
    p.add_argument("--fresh", action="store_true", help="measure every run again, not only those missing")
    p.add_argument("--table", action="store_true", help="only rewrite the section from the runs kept in "
                   "docs/fia-cost.json; measure nothing")
    p.add_argument("--child", choices=["plain", "fia"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        # threads and torch as the measuring process has them
        print(json.dumps({**measure(args.child, args.arch, args.resolution, args.pairs, args.calls),
                          "threads": torch.get_num_threads(),
                          "torch": torch.__version__}))
        return
    from .benchmarks_md import RowStore, update_section

    arch = arch_settings(args.arch)
    store = RowStore(arch["rows"], tuple(run_key("idle", args)), arch["model"])
    fia = lambda: run_in_subprocess("fia", args)
    measure_it = kept if args.table else measured
    plain = measure_it(store, "plain", args, lambda: run_in_subprocess("plain", args))
    runs = {"idle": measure_it(store, "idle", args, fia)}
    if args.load:
        runs["loaded"] = measure_it(store, "loaded", args, lambda: under_load(args.load, fia))
    text = report(plain, runs, args, store)
    print(text)
    update_section(arch["section"], text)


if __name__ == "__main__":
    main()
