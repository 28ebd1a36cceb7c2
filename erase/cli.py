"""erase-concepts: the command line, a thin layer over the Python API."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import EraseError, TrainingStopped

EPILOG = """examples:
  erase-concepts --concepts "van gogh,nudity"                       # the embedded miniature model, offline
  erase-concepts --concepts "style:van gogh,explicit:nudity" --model ./sd15 --config fia-style --set r2=0.03
  erase-concepts --concepts church --eval                           # erase, then evaluate with the mini CLIP
  erase-concepts evaluate runs/my-run --model ./sd15 --clip ViT-L-14  # evaluate a saved run against its base
  erase-concepts evaluate runs/my-run --model ./sd15 --protocol i2p --prompts i2p.csv  # a field protocol
  accelerate launch -m erase.cli evaluate runs/my-run --model ./sd15 --device cuda --protocol i2p --prompts i2p.csv
  erase-concepts apply --patch runs/my-run/patch.safetensors --model ./sd15 --out runs/again  # re-apply a patch
  erase-concepts attack runs/my-run --model ./sd15 --set steps=100   # attack success rate, into runs/my-run/report
"""


RUN_FOLDER = "the folder an erase run wrote (with erase.json and patch.safetensors)"
BASE_MODEL = "the base model the run was made from: as the erasing command's --model"
SEED = ("the method's seed (overrides its config's): for fia and conceptprune (default 1244), of the capture's initial "
        "noise, shared by every prompt, and of the noise that fills masked weights; for esd, salun and dynamic "
        "(default 0), of every training step's draws and of the training images salun and dynamic sample; uce draws "
        "nothing")


class Parser(argparse.ArgumentParser):
    """A parser with --version whose help may list a registry (the methods, the attack kinds): those texts are made
    when the help is shown, so building a parser imports no torch and --version and a mistyped option answer at once."""

    def __init__(self, command: str | None, description: str, epilog: str | None = None) -> None:
        """command: evaluate, apply or attack; None for the erasing command."""
        from . import __version__

        super().__init__(prog=" ".join(filter(None, ("erase-concepts", command))), description=description,
                         epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_argument("--version", action="version", version=f"erase-concepts {__version__}",
                          help="print the version and exit")
        self.listings: dict[argparse.Action, Callable[[], str]] = {}  # option → its help, made when shown

    def format_help(self) -> str:
        for action, listing in self.listings.items():
            action.help = listing()
        return super().format_help()


def method_help() -> str:
    from .methods import METHODS

    return f"erasure method, one of: {', '.join(sorted(METHODS))} (default fia)"


def protocol_help() -> str:
    from .protocols import PROTOCOLS

    return (f"evaluate by a field protocol instead of the catalog's prompts: {', '.join(sorted(PROTOCOLS))}; its "
            "settings with --eval-set (e.g. --eval-set steps=25 --eval-set 'categories=[sexual]'); its images, their "
            "manifest and the report go to --out (default <run>/report-<protocol>), and a rerun generates only what "
            "is missing there")


def attack_kind_help() -> str:
    from .attacks import ATTACKS

    return f"attack kind: {', '.join(sorted(ATTACKS))} (default prompt)"


def parser() -> argparse.ArgumentParser:
    p = Parser(None, "Erase concepts from a text-to-image diffusion model (a Stable Diffusion UNet, SD3, Flux.1 or another "
                           "diffusers transformer) and write the erased checkpoint.", EPILOG)
    erasure = p.add_argument_group("erasure")
    erasure.add_argument("--concepts", required=True,
                         help='comma-separated concepts; "kind:name" sets the kind, "name=>anchor" the anchor')
    p.listings[erasure.add_argument("--method", default="fia")] = method_help
    add_settings_options(erasure, "method preset: a YAML file or a shipped name such as fia-style",
                         "--set r2=0.03 or --set 'overrides.van gogh.r2=0.03'")
    erasure.add_argument("--seed", type=int, help=SEED)
    erasure.add_argument("--catalog", metavar="YAML",
                         help="extra catalog with kinds and concepts (format of erase/prompts/catalog.yaml)")
    add_model_options(p, "'mini' (embedded, default), a hub id in the local cache, a diffusers folder or a "
                         ".safetensors file")
    add_output_options(p, "output folder (default runs/<method>-<concepts>-<time>)")
    add_export_options(p)
    add_evaluation_options(p, switch=True)
    return p


def add_settings_options(group, config: str, example: str) -> None:
    """--config and --set: the settings of a method or an attack kind."""
    group.add_argument("--config", help=config)
    group.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override one setting, e.g. {example} (repeatable)")


def add_model_options(p: argparse.ArgumentParser, model: str, required: bool = False) -> None:
    """The model every command loads, and where it runs."""
    group = p.add_argument_group("model")
    group.add_argument("--model", required=required, default="mini", help=model)
    group.add_argument("--model-config", metavar="FOLDER",
                       help="diffusers folder whose configs describe a single-file --model")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or mps (default cpu)")
    group.add_argument("--dtype", help="float32, float16 or bfloat16 (default: as the model is stored)")


def add_output_options(p: argparse.ArgumentParser, out: str, required: bool = False, overwrite: bool = True) -> None:
    """Where a command writes, and how quietly. overwrite: whether --overwrite applies (an attack adds to a report)."""
    group = p.add_argument_group("output")
    group.add_argument("--out", required=required, metavar="FOLDER", help=out)
    if overwrite:
        group.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that an earlier run wrote")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def add_evaluation_options(p: argparse.ArgumentParser, switch: bool = False) -> None:
    """The evaluation's options; switch: add --eval (the erasing command evaluates only when asked)."""
    group = p.add_argument_group("evaluation", "CLIP judges images of the original and the erased model, generated "
                                               "from the same prompts and seeds")
    if switch:
        group.add_argument("--eval", action="store_true", help="evaluate the erasure after saving it, into <out>/report/")
    group.add_argument("--retain", help="comma-separated concepts that must survive (default: the catalog's others, of "
                       "the erased kinds (in-kind) and of each other kind but explicit (cross-kind))")
    group.add_argument("--eval-set", dest="eval_settings", action="append", default=[], metavar="KEY=VALUE",
                       help="evaluation setting, e.g. --eval-set steps=50 --eval-set 'seeds=[0,1,2]' "
                       "--eval-set max_cross_retain=5 --eval-set bootstrap_samples=2000")
    add_judge_options(group)


def add_judge_options(group) -> None:
    """The CLIP model that judges the images (evaluation and attacks)."""
    group.add_argument("--clip", help="'mini' (default with the mini model) or an open_clip architecture "
                                      "(default ViT-L-14)")
    group.add_argument("--clip-pretrained", help="open_clip pretrained tag or local checkpoint (default openai)")


def evaluate_parser() -> argparse.ArgumentParser:
    p = Parser("evaluate", "Evaluate a saved erase run against its base model.")
    p.add_argument("run", help=RUN_FOLDER)
    add_model_options(p, BASE_MODEL)
    add_output_options(p, "report folder (default <run>/report, or <run>/report-<protocol>)")
    add_evaluation_options(p)
    group = p.add_argument_group("protocol", "the field's protocols, sharded over the processes of a launch "
                                             "(accelerate launch, torchrun) and resumable")
    p.listings[group.add_argument("--protocol")] = protocol_help
    group.add_argument("--prompts", metavar="FILE", help="the protocol's prompt file: a CSV (prompt column; optional "
                       "seed, guidance and categories columns, I2P's layouts included) or a TXT file of one prompt a line")
    return p


def attack_parser() -> argparse.ArgumentParser:
    p = Parser("attack", "Attack a saved erase run: how often an attacker brings its concepts back (attack success "
                         "rate), added to <run>/report.")
    p.add_argument("run", help=RUN_FOLDER)
    attack = p.add_argument_group("attack")
    p.listings[attack.add_argument("--kind", default="prompt")] = attack_kind_help
    attack.add_argument("--concepts", help="comma-separated erased concepts to attack (default: all of them)")
    add_settings_options(attack, "attack settings: a YAML file", "--set steps=100 --set 'seeds=[0,1]'")
    add_judge_options(p.add_argument_group("judge", "the CLIP model that tells whether an image shows the concept"))
    add_model_options(p, BASE_MODEL)
    add_output_options(p, "report folder to add the attack to (default <run>/report; an evaluation there is kept)",
                       overwrite=False)
    return p


def attack_run(args: argparse.Namespace) -> None:
    from .attacks import attack
    from .attacks.core import attack_config, chosen_concepts
    from .attacks.report import check_report_dir
    from .config import parse_settings
    from .evaluation import saved_erasure
    from .evaluation.judge import Judge
    from .export import check_output_dir, reserved

    run_dir = Path(args.run)
    erasure = saved_erasure(run_dir)  # a damaged run, bad settings or a bad judge: refused before the model loads
    config = attack_config(args.kind, args.config, **parse_settings(args.settings))
    concepts = chosen_concepts(erasure.concepts, args.concepts)
    if args.clip:
        Judge.check(args.clip, args.clip_pretrained)
    model = model_paths(args, check_model_options(args))
    identity = {"base_fingerprint": erasure.base_fingerprint, "method": erasure.method,
                "concepts": [c.as_dict() for c in erasure.concepts]}
    out = check_report_dir(Path(args.out) if args.out else run_dir / "report", identity)
    check_output_dir(out, overwrite=True, reads={"the run folder": run_dir, **model, "--config": args.config},
                     report_of=run_dir)
    with reserved(out, overwrite=True):
        report = attack(load_model(args), run_dir, concepts=[c.name for c in concepts], kind=args.kind, config=config,
                        clip=args.clip, clip_pretrained=args.clip_pretrained, progress=not args.quiet)
        report.save(out)
    print(report.markdown().split("\n### Prompts found")[0])
    print(wrote(out))


def apply_parser() -> argparse.ArgumentParser:
    p = Parser("apply", "Re-apply a saved patch to its base model and write the erased checkpoint.")
    p.add_argument("--patch", required=True, help="patch.safetensors of an erase run")
    add_model_options(p, "the base model the patch was made from", required=True)
    add_output_options(p, "output folder", required=True)
    add_export_options(p)
    return p


def add_export_options(p: argparse.ArgumentParser) -> None:
    """The files of an erased checkpoint beside its denoiser folder (unet/ or transformer/) and erase.json."""
    group = p.add_argument_group("export")
    single = group.add_mutually_exclusive_group()
    single.add_argument("--single-file", dest="single_file", action="store_true", default=None,
                        help="require <out>/<name>.safetensors: a model without a single-file layout is refused "
                             "before any work (default: written where the model has one)")
    single.add_argument("--no-single-file", dest="single_file", action="store_false", default=None,
                        help="skip <out>/<name>.safetensors (the single file for A1111/ComfyUI/Forge in the model "
                             "family's layout)")
    group.add_argument("--half", action="store_true", help="store the single file in float16")
    group.add_argument("--no-patch", dest="patch", action="store_false",
                       help="leave out <out>/patch.safetensors: it lists every edited weight (a map for a revival "
                            "attack); evaluate and attack read saved runs through it")
    group.add_argument("--lora", metavar="RANK", help="also write <out>/<name>-lora-r<RANK>.safetensors, the edit as a "
                       "kohya LoRA of that rank (or 'full') for A1111, ComfyUI and diffusers; training methods only "
                       "(esd, salun, uce, dynamic)")


def load_model_to_export(args: argparse.Namespace):
    """The model, after refusing --single-file for a model that has no single-file layout (before any work)."""
    from .families import family_of

    pipe = load_model(args)
    problem = family_of(pipe).single_file_problem(pipe) if args.single_file else None
    if problem:
        raise EraseError(f"--single-file asked for a file this model cannot have: {problem}, or drop --single-file")
    return pipe


def save_and_report(args: argparse.Namespace, result, out: Path) -> None:
    """Save the result; say on the console that the patch is a map for attackers, and why there is no single file
    if there is none."""
    from .lora import summary

    result.save(out, overwrite=args.overwrite, single_file=args.single_file, half=args.half, lora=args.lora,
                patch=args.patch)
    if args.patch:
        print("note: patch.safetensors lists every edited weight, a map for an attacker who revives erased concepts: "
              "share the erased checkpoint, keep the patch private (--no-patch leaves it out)", file=sys.stderr)
    single = result.record["single_file"]
    if single["name"] is None:
        half = " (--half had no effect)" if args.half else ""
        print(f"note: no single file written{half}: {single['why']}", file=sys.stderr)
    if args.lora is not None:
        print(summary(result.record["lora"]))


def check_lora_option(args: argparse.Namespace, method: str | None) -> None:
    """--lora's rank, and that the method has a weight delta to factor, before any model loads."""
    from .lora import check_lora_method, parse_rank
    from .methods import get_method

    if args.lora is not None:
        args.lora = parse_rank(args.lora)
        check_lora_method(get_method(method), args.lora)


def wrote(out: Path) -> str:
    """The last console line: the folder and every file and folder in it."""
    names = sorted(f"{p.name}/" if p.is_dir() else p.name for p in out.iterdir())
    return f"wrote {out}/: {', '.join(names)}"


def apply_run(args: argparse.Namespace) -> None:
    from .api import result_from_patch
    from .export import check_output_dir, read_patch, reserved

    _, metadata = read_patch(args.patch)  # a corrupt patch fails before the model loads
    check_lora_option(args, metadata.get("method"))
    model = model_paths(args, check_model_options(args))
    out = check_output_dir(args.out, args.overwrite, reads={"--patch": args.patch, **model})
    with reserved(out, args.overwrite):
        save_and_report(args, result_from_patch(load_model_to_export(args), args.patch), out)
    print(wrote(out))


def check_eval_options(args: argparse.Namespace, catalog) -> dict:
    """The evaluation's settings, with the judge and the retain list, refused before any model loads."""
    from .concepts import parse_concepts
    from .config import build_config, parse_settings
    from .evaluation import EvalSettings
    from .evaluation.judge import Judge

    settings = parse_settings(args.eval_settings)
    build_config(EvalSettings, settings)
    if args.clip:
        Judge.check(args.clip, args.clip_pretrained)
    if retain_list(args):
        parse_concepts(retain_list(args), catalog)
    return settings


def retain_list(args: argparse.Namespace) -> list[str] | None:
    return None if args.retain is None else [c for c in args.retain.split(",") if c.strip()]


def run_evaluation(args: argparse.Namespace, pipe, erased, out: Path, settings: dict) -> None:
    from .evaluation import evaluate

    report = evaluate(pipe, erased, retain=retain_list(args), clip=args.clip, clip_pretrained=args.clip_pretrained,
                      progress=not args.quiet, **settings)
    report.save(out, overwrite=args.overwrite)
    print("\n".join(report.markdown().split("\n## Forgetting")[0].splitlines()[2:]))


def default_out(method: str, concepts: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", concepts.lower()).strip("-")[:60] or "concepts"
    return Path("runs") / f"{method}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def is_main_process() -> bool:
    """False in all but one process of a data-parallel launch (torchrun and accelerate launch set RANK)."""
    return os.environ.get("RANK", "0") == "0"


def run(args: argparse.Namespace) -> Path:
    from .api import erase, resolve_config
    from .card import write_card
    from .concepts import load_catalog, parse_concepts
    from .config import parse_settings
    from .export import check_output_dir, reserved
    from .methods import check_concepts
    from .profile import profile_of

    settings = parse_settings(args.settings)
    if args.seed is not None:
        settings["seed"] = args.seed
    config = resolve_config(args.method, args.config, **settings)
    check_lora_option(args, args.method)
    catalog = load_catalog(profile_of(args.model).catalog, extra=args.catalog)
    concepts = parse_concepts(args.concepts, catalog)  # fail on bad input before loading any model
    check_concepts(args.method, concepts, config)
    model = model_paths(args, check_model_options(args))
    eval_settings = check_eval_options(args, catalog) if args.eval else {}
    if args.out is None:
        args.out = default_out(args.method, args.concepts)
        args.out.parent.mkdir(exist_ok=True)
    reads = {**model, "--config": args.config, "--catalog": args.catalog,
             "checkpoint_dir": getattr(config, "checkpoint_dir", None)}
    out = check_output_dir(args.out, args.overwrite, reads)
    for item, concept in zip(args.concepts.split(","), concepts):  # parse_concepts splits the same way
        if concept.name not in catalog.concepts and ":" not in item.partition("=>")[0]:  # its kind is a guess
            print(f"note: {concept.name!r} is not in catalog {catalog.name!r}; its prompts are those of kind "
                  f"{concept.kind!r} (write kind:name to choose another)", file=sys.stderr)
    main_process = is_main_process()
    # A second run for this --out is refused now, not after its work.
    with reserved(out, args.overwrite) if main_process else contextlib.nullcontext():
        pipe = load_model_to_export(args)
        result = erase(pipe, concepts, method=args.method, config=config, catalog=catalog, progress=not args.quiet)
        if not main_process:  # a data-parallel launch: all processes hold the same edit; one writes
            return out
        print(result.summary())
        save_and_report(args, result, out)
        if args.eval:
            run_evaluation(args, pipe, result, out / "report", eval_settings)
            write_card(out)  # with the evaluation's numbers now
    print(wrote(out))
    return out


def evaluate_run(args: argparse.Namespace) -> None:
    from .card import write_card
    from .concepts import load_catalog
    from .evaluation import saved_erasure
    from .export import check_output_dir, reserved

    if args.protocol or args.prompts:
        return protocol_run(args)
    run_dir = Path(args.run)
    settings = check_eval_options(args, load_catalog(saved_erasure(run_dir).catalog))  # a damaged run: refused now
    model = model_paths(args, check_model_options(args))
    out = check_output_dir(Path(args.out) if args.out else run_dir / "report", args.overwrite,
                           reads={"the run folder": run_dir, **model}, report_of=run_dir)
    with reserved(out, args.overwrite):
        run_evaluation(args, load_model(args), run_dir, out, settings)
    if out.resolve() == (run_dir / "report").resolve():  # the run's own report: its model card shows the numbers
        write_card(run_dir)
    print(wrote(out))


def protocol_run(args: argparse.Namespace) -> None:
    """evaluate --protocol: the run's erasure by a field protocol; in a launch of several processes each generates
    its shard on its own device and the main process writes and prints the report."""
    from .config import parse_settings
    from .evaluation import saved_erasure
    from .protocols.core import checked_protocol, protocol_config, run_protocol

    if not args.protocol:
        raise EraseError("--prompts needs --protocol: e.g. --protocol i2p or --protocol prompts")
    if args.retain is not None:
        raise EraseError("--retain applies to the catalog evaluation, not to a protocol: drop it or drop --protocol")
    run_dir = Path(args.run)
    saved_erasure(run_dir)  # a damaged run: refused before the model loads
    settings = parse_settings(args.eval_settings)
    settings.update({k: v for k, v in (("prompts", args.prompts), ("clip", args.clip),
                                       ("clip_pretrained", args.clip_pretrained)) if v is not None})
    config = protocol_config(args.protocol, **settings)  # bad settings, a missing file: refused now
    runner = checked_protocol(args.protocol, config, args.model)  # and what it cannot score, or read, before the model
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and args.device == "cuda":  # one process per GPU
        args.device = f"cuda:{local_rank}"
    check_model_options(args)
    out = Path(args.out) if args.out else run_dir / f"report-{args.protocol}"
    report = run_protocol(args.protocol, runner, load_model(args), run_dir, out, progress=not args.quiet)
    if report is not None:  # the main process
        print(report.markdown())
        print(wrote(out))


def check_model_options(args: argparse.Namespace) -> str:
    """--device, --dtype, --model and --model-config, from their text and the paths alone (no diffusers yet); what
    --model names ('mini', 'file', 'folder' or 'hub')."""
    from .models import check_device, check_model, resolve_dtype

    check_device(args.device, resolve_dtype(args.dtype))
    return check_model(args.model, args.model_config)


def model_paths(args: argparse.Namespace, kind: str) -> dict[str, str | None]:
    """The model's paths on disk by option, which --out must keep (the mini model and a hub id are none the user
    gave)."""
    return {"--model": args.model if kind in ("file", "folder") else None, "--model-config": args.model_config}


def load_model(args: argparse.Namespace):
    from .models import load_pipeline

    if args.quiet:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    return load_pipeline(args.model, device=args.device, dtype=args.dtype, config=args.model_config)


STOPPED = 75  # EX_TEMPFAIL: run the same command again to continue


def on_disk() -> str:
    """What an interrupted command leaves: the outputs it had already put in place, if any."""
    export = sys.modules.get(f"{__package__}.export")  # not imported yet: interrupted during start-up
    done = " and ".join(f"{path}/" for path in export.written) if export else ""
    return f"{done} had been written completely, nothing else was" if done else "nothing was written"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        commands = {"evaluate": (evaluate_parser, evaluate_run), "apply": (apply_parser, apply_run),
                    "attack": (attack_parser, attack_run)}
        make_parser, command = commands.get(argv[0] if argv else "", (parser, run))
        args = make_parser().parse_args(argv[1:] if command is not run else argv)
        from . import export  # heavy (torch): inside the try, so Ctrl-C during start-up is one line too

        export.written.clear()
        command(args)
    except TrainingStopped as exc:  # asked for (stop_after): not an error, but nothing was written yet
        print(f"erase-concepts: {exc}", file=sys.stderr)
        return STOPPED
    except EraseError as exc:
        print(f"erase-concepts: error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print(f"erase-concepts: interrupted; {on_disk()}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
