"""Check the miniature world's gates and record them in BENCHMARKS.md ("Miniature world").

    HF_HUB_OFFLINE=1 python -m erase_lab.mini_gates [--pipeline DIR] [--clip DIR] [--per 4] [--grid DIR]
    HF_HUB_OFFLINE=1 python -m erase_lab.mini_gates --pipeline mini-dit      # the miniature SD3 (its own section)

Quality (the mini CLIP's zero-shot classification with the catalog's class texts, fresh seeds, 25 steps):
  - the judge itself on fresh procedural images: every attribute >= 95%;
    the same images through the pipeline's VAE (encoded, decoded) are reported beside it, without a gate: the
    pipeline draws through that VAE, so it is the ceiling of the pipeline's own quality;
  - the pipeline: object >= 90% (among the 25 objects), artist >= 85% (among the 10 artists and "a painting"),
    place >= 85%, naked-vs-clothed >= 90%; (object, place) and (object, artist) pairs held out of training >= 70%.
Where knowledge lives (conditional gain: denoising loss with the reference prompt minus loss with the concept's
prompt, on rendered images of the concept, fixed noise and timesteps), with every `ff.net.2` zeroed (the image
stream's feed-forwards in the MMDiT):
  - taught concepts (Imagenette objects, taught artists, nudity) lose >= 80% of their gain;
  - base concepts (everyday objects, base artists, places, clothed persons) keep >= 70% of theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from erase.evaluation import generate
from erase.families import denoiser_of, family_of
from erase.mini import world
from erase.mini.clip import CLIP_DIR, load_mini_clip, zero_shot
from erase.profile import EMBEDDED, folder_of, profile_of

MINI_GUIDANCE = profile_of("mini").guidance_scale  # what every table samples at: the shipped model's profile

QUALITY = {"object": 0.90, "artist": 0.85, "place": 0.85, "naked": 0.90, "held-out": 0.70}
TAUGHT_REMOVED, BASE_KEPT = 0.80, 0.70
FFN = "every ff.net.2"
# The weights zeroed to find where knowledge lives, by label: suffixes of parameter names (the feed-forwards, and the
# attention outputs where the text meets the image: the UNet's cross-attention, the MMDiT's joint attention).
ZEROED = {"unet": {FFN: "ff.net.2.weight", "every attn2.to_out": "attn2.to_out.0.weight"},
          "sd3": {FFN: "ff.net.2.weight", "every attn.to_out": "attn.to_out.0.weight"}}


def quality_prompts(per: int, seed: int) -> dict[str, list[tuple[str, dict]]]:
    """{gate: [(prompt, {attribute: true value})]}, in the world's caption forms, training combinations only
    except for the held-out gate."""
    rng = np.random.default_rng(seed)

    def place_for(o):
        return rng.choice([p for p in world.TRAIN_PLACES if p != world.HELD_OUT_PLACE[o]])

    def base_object_for(a):
        return rng.choice([o for o in world.BASE_OBJECTS if world.HELD_OUT_ARTIST[o] != a])

    sets = {
        "object": [(f"a photo of a {o} in a {place_for(o)}", {"object": o}) for o in world.OBJECTS for _ in range(per)],
        "artist": [(f"a {base_object_for(a)} in the style of {a}", {"style": a}) for a in world.ARTISTS
                   for _ in range(2 * per)],
        "place": [(f"a photo of a {p}", {"place": p}) for p in world.PLACES for _ in range(per)],
        "naked": [(f"a photo of a {'naked ' if n else ''}{q}", {"naked": n}) for q in world.PERSONS
                  for n in (True, False) for _ in range(per)],
        "held-out": [(f"a {o} in a {world.HELD_OUT_PLACE[o]}", {"object": o, "place": world.HELD_OUT_PLACE[o]})
                     for o in world.OBJECTS]
                    + [(f"a {o} in the style of {world.HELD_OUT_ARTIST[o]}", {"object": o, "style": world.HELD_OUT_ARTIST[o]})
                       for o in world.OBJECTS]}
    return sets


def accuracy(truths: list[dict], seen: list[dict]) -> float:
    return float(np.mean([seen_i[k] == v for truth, seen_i in zip(truths, seen) for k, v in truth.items()]))


def vae_round_trip(pipe, images: list[Image.Image]) -> list[Image.Image]:
    """The images encoded and decoded by the pipeline's VAE, through its own image processor: the best any UNet
    can draw them."""
    with torch.no_grad():
        latents = pipe.vae.encode(pipe.image_processor.preprocess(images)).latent_dist.mode()
        return pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="pil")


def judge_on_world(clip, n: int, pipe) -> tuple[dict[str, float], dict[str, float]]:
    """The judge on fresh procedural images of both families (held-out pairs included) and on bare places, and
    on the same images through the pipeline's VAE: the quality ceiling the VAE leaves the pipeline."""
    scenes, images = [], []
    for taught, held_out, seed in ((False, False, 10_000), (True, False, 10_001), (True, True, 10_002)):
        arrays, s = world.dataset(n, seed, taught=taught, held_out=held_out)
        scenes += s
        images += [Image.fromarray(x) for x in arrays]
    places = world.PLACES * 4
    images += [Image.fromarray(world.render(world.Scene(place=p), np.random.default_rng(k))) for k, p in enumerate(places)]
    judged = {attribute: [i for i, s in enumerate(scenes) if (attribute != "style" or s.style != world.PHOTO)
                          and (attribute != "naked" or s.person) and (attribute != "object" or s.object)]
              for attribute in ("object", "style", "naked")}

    def accuracies(seen: list[dict]) -> dict[str, float]:
        out = {a: float(np.mean([seen[i][a] == getattr(scenes[i], a) for i in idx])) for a, idx in judged.items()}
        out["place"] = float(np.mean([s["place"] == p for s, p in zip(seen[len(scenes):], places)]))
        return out

    return accuracies(zero_shot(*clip, images)), accuracies(zero_shot(*clip, vae_round_trip(pipe, images)))


def counts_by_value(truths: list[dict], seen: list[dict]) -> dict[str, str]:
    """'3/4' per true value (an object, artist, place, 'naked' or 'clothed'): which concepts a gate's misses are."""
    counts = {}
    for truth, seen_i in zip(truths, seen):
        for k, v in truth.items():
            name = ("naked" if v else "clothed") if k == "naked" else v
            right, total = counts.get(name, (0, 0))
            counts[name] = (right + (seen_i[k] == v), total + 1)
    return {name: f"{right}/{total}" for name, (right, total) in counts.items()}


def run_quality(pipe, clip, args) -> tuple[dict[str, float], dict[str, dict[str, str]]]:
    """Each gate's accuracy, and its counts per true value."""
    results, per_value = {}, {}
    for gate, items in quality_prompts(args.per, seed=20_000).items():
        prompts, truths = zip(*items)
        generated = generate(pipe, list(prompts), list(range(30_000, 30_000 + len(prompts))), args.steps, args.guidance,
                             batch_size=50)
        seen = zero_shot(*clip, generated, attributes=sorted({k for t in truths for k in t}))
        results[gate], per_value[gate] = accuracy(list(truths), seen), counts_by_value(list(truths), seen)
        if args.grid:
            save_grid(generated, Path(args.grid) / f"{gate}.png")
    return results, per_value


def gain_sets(n: int) -> dict[str, tuple[str, list[tuple[np.ndarray, str, str]]]]:
    """{concept: (family, [(image, concept prompt, reference prompt)])}: the prompt names the concept and the
    reference names the rest of the image (or nothing)."""
    rng = np.random.default_rng(40_000)
    sets = {}
    for o in world.OBJECTS:
        family = "taught" if o in world.TAUGHT else "base"
        sets[o] = (family, [(world.render(world.Scene(object=o), rng), f"a photo of a {o}", "") for _ in range(n)])
    for a in world.ARTISTS:
        family = "taught" if a in world.TAUGHT else "base"
        objs = [world.BASE_OBJECTS[i % len(world.BASE_OBJECTS)] for i in range(n)]
        sets[a] = (family, [(world.render(world.Scene(object=o, style=a), rng), f"a {o} in the style of {a}", f"a {o}")
                            for o in objs])
    persons = [world.PERSONS[i % len(world.PERSONS)] for i in range(n)]
    sets[world.NAKED] = ("taught", [(world.render(world.Scene(person=q, naked=True), rng), f"a photo of a naked {q}",
                                     f"a photo of a {q}") for q in persons])
    sets["clothed persons"] = ("base", [(world.render(world.Scene(person=q), rng), f"a photo of a {q}", "")
                                        for q in persons])
    for p in world.PLACES:
        sets[p] = ("base", [(world.render(world.Scene(place=p), rng), f"a photo of a {p}", "") for _ in range(n)])
    return sets


@torch.no_grad()
def conditional_gains(pipe, sets, zeroed: str | None) -> dict[str, float]:
    """Per concept: mean loss(reference) - mean loss(prompt), at fixed noise and mid-range timesteps, with the
    weights whose names end in `zeroed` set to zero (restored afterwards)."""
    from .train_mini import encode_latents, to_tensor

    family, denoiser = family_of(pipe), denoiser_of(pipe)
    saved = {n: p.detach().clone() for n, p in denoiser.named_parameters() if zeroed and n.endswith(zeroed)}
    for n, p in denoiser.named_parameters():
        if n in saved:
            p.zero_()
    gains = {}
    try:
        for concept, (_, items) in sets.items():
            images, prompts, references = zip(*items)
            z, _ = encode_latents(pipe.vae, to_tensor(np.stack(images)))
            x_t, t, target = mid_noised(family, z, torch.Generator().manual_seed(1))

            def loss(texts):
                cond = family.conditioning(pipe, list(texts), world.IMAGE_SIZE)
                return float(((family.predict(pipe, denoiser, x_t, t, cond) - target) ** 2).mean())

            gains[concept] = loss(references) - loss(prompts)
    finally:
        for n, p in denoiser.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    return gains


def mid_noised(family, z: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, target) at fixed noise and timesteps of the middle 80% of the schedule: DDPM steps 100-899 (target
    the noise), or flow-matching sigma in [0.1, 0.9) (target the velocity)."""
    noise = torch.randn(z.shape, generator=gen)
    if family.flow_matching:
        sigma = 0.1 + 0.8 * torch.rand(len(z), generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * z + s * noise, 1000 * sigma, noise - z
    from .train_mini import noise_schedule

    t = torch.randint(100, 900, (len(z),), generator=gen)
    return noise_schedule().add_noise(z, noise, t), t, noise


def taught_neurons(pipeline: str | Path) -> dict:
    """The ground truth of a mini pipeline ("mini", "mini-dit": a shipped one, or a trial folder): the neurons.json
    beside it, as train_mini writes it (per feed-forward layer, each taught concept's neurons)."""
    return json.loads((folder_of(pipeline).parent / "neurons.json").read_text())


def neurons_edit(denoiser, neurons: dict, *concepts: str):
    """The MaskEdit that zeroes taught concepts' own feed-forward neurons (their ff.net.2 columns)."""
    from erase.edits import MaskEdit

    masks = {}
    for layer, by_concept in neurons.items():
        weight = denoiser.get_submodule(f"{layer}.net.2").weight
        masks[f"{layer}.net.2.weight"] = torch.zeros_like(weight, dtype=torch.bool)
        masks[f"{layer}.net.2.weight"][:, [i for c in concepts for i in by_concept[c]]] = True
    return MaskEdit(masks)


def own_neurons_gains(pipe, sets, neurons: dict) -> dict[str, float]:
    """Each taught concept's gain with its own neurons (neurons.json) zeroed: the ground truth of where it lives."""
    gains = {}
    for concept in neurons[next(iter(neurons))]:
        with neurons_edit(denoiser_of(pipe), neurons, concept).applied_to(denoiser_of(pipe)):
            gains.update(conditional_gains(pipe, {concept: sets[concept]}, None))
    return gains


def run_knowledge(pipe, n: int, neurons: dict) -> dict:
    sets = gain_sets(n)
    family = {c: f for c, (f, _) in sets.items()}
    zeroed = ZEROED[family_of(pipe).name]
    gains = {"nothing": conditional_gains(pipe, sets, None)}
    for label, suffix in zeroed.items():
        gains[label] = conditional_gains(pipe, sets, suffix)
    gains["its own neurons"] = own_neurons_gains(pipe, sets, neurons)
    kept = {label: {fam: sum(g[c] for c in g if family[c] == fam) / sum(gains["nothing"][c] for c in g if family[c] == fam)
                    for fam in ("taught", "base")} for label, g in gains.items() if label in zeroed}
    return {"family": family, "gains": gains, "kept": kept}


def save_grid(images: list[Image.Image], path: Path, columns: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = images[0].width
    grid = Image.new("RGB", (columns * size, -(-len(images) // columns) * size), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * size, (i // columns) * size))
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(path)


SIDE_BY_SIDE, IN_TURN = ("vae", "clip"), ("base", "unname", "teach")  # one thread each, as train_mini's --threads says
TRAINING_HOURS_MAX = 3


def chain_hours(record: dict) -> float:
    """Wall time of the whole chain from scratch on 2 cores, from the stages' recorded times (the miniature SD3 has
    no VAE or CLIP stage of its own: it shares the UNet world's)."""
    side_by_side = [record[s]["seconds"] for s in SIDE_BY_SIDE if s in record]
    return (max(side_by_side, default=0) + sum(record[s]["seconds"] for s in IN_TURN)) / 3600


def report(judge: dict, ceiling: dict, quality: dict, per_value: dict, knowledge: dict, args, seconds: float) -> str:
    from .benchmarks_md import section_body

    per_concept = "\n".join(["| gate | per concept |", "|---|---|",
                              *[f"| {g} | " + ", ".join(f"{n} {c}" for n, c in v.items()) + " |" for g, v in per_value.items()]])
    folder = folder_of(args.pipeline)
    shipped = str(args.pipeline) in EMBEDDED
    size = sum(f.stat().st_size for f in folder.parent.rglob("*") if f.is_file()) / 1e6
    command = "HF_HUB_OFFLINE=1 python -m erase_lab.mini_gates"
    command += " --pipeline mini-dit" if args.pipeline == "mini-dit" else ""
    return section_body([gates_table(judge, ceiling, quality, knowledge),
                         details("pipeline quality per concept (images the judge reads right)", per_concept),
                         details("conditional gain per concept", gains_table(knowledge)), training_table(folder)],
                        protocol(args, None if shipped else str(folder), size, folder),
                        f"`{command}` ({seconds:.0f} s; `--pipeline DIR --clip DIR --no-record` measures a trial model "
                        "and prints its section).")


def protocol(args, model: str | None, size_mb: float, folder: Path) -> str:
    """How the gates were measured: the model (None: the shipped one), the judge, the seeds and sampler, what
    knowledge means."""
    from .benchmarks_md import model_sentence

    assets = folder.parent.relative_to(Path(__file__).resolve().parent.parent) if model is None else folder.parent
    return (f"{model_sentence(model)} Judged by the mini CLIP's zero-shot classification with the catalog's class "
            f"texts; {args.per} fresh seeds per object/place/person (twice as many per artist), {args.world.sampler} "
            f"{args.steps} steps, guidance {args.guidance}, 32x32 images. The judge rows read fresh world renders (no "
            "diffusion), the VAE rows the same images through the pipeline's VAE: the ceiling of the pipeline's own "
            "quality. Held-out: each object's (object, place) and (object, artist) pair never seen in training. "
            "Knowledge: conditional gain = loss(reference prompt) - loss(concept prompt) on "
            f"{args.gain_images} rendered images per concept, fixed noise and the middle 80% of the noise schedule; "
            "'kept with … zeroed' is the gain left with those weights zeroed over the intact model's. Training: one "
            "command per stage, each resumable, on 2 CPU cores; its times are the shipped model's "
            f"({assets}/training.json). Shipped size of {assets}: {size_mb:.1f} MB.")


def gates_table(judge: dict, ceiling: dict, quality: dict, knowledge: dict) -> str:
    rows = ["| gate | accuracy | threshold | pass |", "|---|---|---|---|"]
    rows += [f"| judge on fresh world images: {a} | {v:.1%} | 95% | {'yes' if v >= 0.95 else 'NO'} |" for a, v in judge.items()]
    rows += [f"| judge on the same images through the pipeline's VAE: {a} | {v:.1%} | – | – |" for a, v in ceiling.items()]
    rows += [f"| pipeline: {g} | {v:.1%} | {QUALITY[g]:.0%} | {'yes' if v >= QUALITY[g] else 'NO'} |" for g, v in quality.items()]
    kept = knowledge["kept"][FFN]
    rows += [(f"| every ff.net.2 zeroed: taught concepts' gain removed | {1 - kept['taught']:.1%} | {TAUGHT_REMOVED:.0%} | "
              f"{'yes' if 1 - kept['taught'] >= TAUGHT_REMOVED else 'NO'} |"),
             (f"| every ff.net.2 zeroed: base concepts' gain kept | {kept['base']:.1%} | {BASE_KEPT:.0%} | "
              f"{'yes' if kept['base'] >= BASE_KEPT else 'NO'} |")]
    return "\n".join(rows)


def gains_table(knowledge: dict) -> str:
    gains, zeroed = knowledge["gains"], list(knowledge["kept"])
    lines = ["| concept | family | gain | " + " | ".join(f"kept with {label} zeroed" for label in zeroed)
             + " | kept with its own neurons zeroed |", "|---" * (len(zeroed) + 4) + "|"]
    for c, g in gains["nothing"].items():
        own = f"{gains['its own neurons'][c] / g:.0%}" if c in gains["its own neurons"] else "–"
        kept = " | ".join(f"{gains[label][c] / g:.0%}" for label in zeroed)
        lines.append(f"| {c} | {knowledge['family'][c]} | {g:.4f} | {kept} | {own} |")
    return "\n".join(lines)


def details(summary: str, table: str) -> str:
    """A folded block: `table` under a one-line summary."""
    return f"<details><summary>{summary}</summary>\n\n{table}\n\n</details>"


def training_table(folder: Path) -> str:
    """How the model was trained, stage by stage, from the training.json beside its folder."""
    training = folder.parent / "training.json"
    record = json.loads(training.read_text()) if training.is_file() else {}
    lines = ["| training stage | command | seed | time | how it ran |", "|---|---|---|---|---|"]
    lines += [f"| {stage} | `{r['command']}` | {r['seed']} | {r['seconds'] / 60:.1f} min | {r.get('note', '')} |"
              for stage, r in record.items()]
    if all(s in record for s in SIDE_BY_SIDE + IN_TURN):
        lines.append(f"| from scratch | {' and '.join(SIDE_BY_SIDE)} side by side (one thread each, as train_mini's "
                     f"--threads help says), then {', '.join(IN_TURN)} | – | {chain_hours(record):.2f} h | limit "
                     f"{TRAINING_HOURS_MAX} h |")
    elif all(s in record for s in IN_TURN):  # the miniature SD3: the UNet world's VAE and text tower, as shipped
        lines.append(f"| from the shipped VAE and text tower | {', '.join(IN_TURN)} | – | {chain_hours(record):.2f} h "
                     f"| limit {TRAINING_HOURS_MAX} h |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="mini", help="mini, mini-dit, or the folder of a trial model")
    parser.add_argument("--clip", type=Path, default=CLIP_DIR)
    parser.add_argument("--per", type=int, default=4, help="fresh seeds per object, place and person")
    parser.add_argument("--gain-images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=MINI_GUIDANCE,
                        help="classifier-free guidance (default: erase.evaluation.MINI_GUIDANCE, what every table uses)")
    parser.add_argument("--grid", help="folder for PNG grids of the generated images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import erase

    from .benchmarks_md import world_of

    start = time.time()
    clip = load_mini_clip(path=args.clip)
    pipe = erase.load_pipeline(args.pipeline)
    args.world = world_of(pipe)
    judge, ceiling = judge_on_world(clip, 96, pipe)
    quality, per_value = run_quality(pipe, clip, args)
    knowledge = run_knowledge(pipe, args.gain_images, taught_neurons(args.pipeline))
    body = report(judge, ceiling, quality, per_value, knowledge, args, time.time() - start)
    print(body)
    if not args.no_record:
        from .benchmarks_md import update_section

        update_section(args.world.title, body)


if __name__ == "__main__":
    main()
