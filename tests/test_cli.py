"""The command line: a full run on a saved tiny pipeline, and every bad input as a one-line error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from erase.cli import main
from erase_lab.tiny import tiny_pipeline

FAST = ["--set", "prompts_per_concept=2", "--set", "saliency_steps=2", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    tiny_pipeline().save_pretrained(path, safe_serialization=True)
    return path


def test_full_run_writes_the_checkpoint(model_dir, tmp_path, capsys, monkeypatch):
    import erase.config

    built, build = [], erase.config.build_config
    monkeypatch.setattr(erase.config, "build_config", lambda cls, settings: built.append(cls) or build(cls, settings))
    out = tmp_path / "run"
    code = main(["--concepts", "style:van gogh, church=>building", "--model", str(model_dir), "--out", str(out),
                 "--config", "fia-style", "--set", "r2=0.03", "--seed", "5", *FAST])
    assert code == 0
    record = json.loads((out / "erase.json").read_text())
    assert record["seed"] == 5 and record["config"]["r2"] == 0.03 and record["config"]["alpha"] == 0.8
    assert record["config"]["overrides"] == {"van gogh": {"r2": 0.03}}  # from the preset
    assert record["concepts"][1] == {"name": "church", "kind": "object", "anchor": "building", "text": "church"}
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "total" in printed
    assert printed.splitlines()[-1] == f"wrote {out}/: README.md, erase.json, patch.safetensors, run.safetensors, unet/"
    assert [cls.__name__ for cls in built] == ["FIAConfig"]  # built from the options once, not again by erase()


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory):
    """A UNet with a guidance embedding (time_cond_proj_dim, as LCM-distilled models have): no single-file layout."""
    path = tmp_path_factory.mktemp("models") / "tiny-lcm"
    tiny_pipeline(time_cond_proj_dim=8).save_pretrained(path, safe_serialization=True)
    return path


def test_a_run_without_a_single_file_says_why_and_that_half_did_nothing(lcm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--concepts", "church", "--model", str(lcm_dir), "--out", str(out), "--half", *FAST]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "single file" in line]
    assert len(notes) == 1 and "--half had no effect" in notes[0] and "unet.time_embedding.cond_proj" in notes[0]
    assert captured.out.splitlines()[-1] == f"wrote {out}/: README.md, erase.json, patch.safetensors, unet/"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "erase.json", "patch.safetensors", "unet"]


def test_single_file_is_required_before_any_work(lcm_dir, tmp_path, capsys, monkeypatch):
    import erase.api

    monkeypatch.setattr(erase.api, "erase", lambda *a, **k: pytest.fail("the erasure ran before the refusal"))
    bad(["--concepts", "church", "--model", str(lcm_dir), "--single-file"], capsys, tmp_path,
        "--single-file asked for a file this model cannot have")


def test_every_flag_that_model_errors_name_exists():
    """A user who follows an error's advice must not get 'unrecognized arguments' (--config vs --model-config)."""
    import re

    import erase.models
    from erase.cli import apply_parser, evaluate_parser, parser

    known = set.intersection(*({option for action in make()._actions for option in action.option_strings}
                               for make in (parser, evaluate_parser, apply_parser)))  # models.py serves all three
    named = set(re.findall(r"--[a-z][a-z-]*", Path(erase.models.__file__).read_text()))
    assert named and named <= known, named - known


@pytest.mark.parametrize("make", ["parser", "evaluate_parser", "apply_parser", "attack_parser"])
def test_every_option_has_help_and_the_shared_ones_their_group(make):
    import erase.cli

    p = getattr(erase.cli, make)()
    shown = p.format_help()  # makes the help texts that list a registry
    assert all(action.help for action in p._actions), [a.option_strings for a in p._actions if not a.help]
    groups = {group.title: [action.dest for action in group._group_actions] for group in p._action_groups}
    assert groups["model"] == ["model", "model_config", "device", "dtype"] and "quiet" in groups["output"]
    assert "\nmodel:\n" in shown and "--version" in shown


def test_version_answers_without_importing_torch():
    import erase

    script = ("import sys\nfrom erase.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n"
              "    print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [f"erase-concepts {erase.__version__}", "False"]


def bad(args: list[str], capsys, tmp_path, match: str) -> None:
    out = tmp_path / "out"
    code = main([*FAST, *args, "--out", str(out)])  # the case's own --set comes last and wins
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("erase-concepts: error:"), err
    assert match in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("args,match", [
    (["--concepts", ""], "empty concept"),
    (["--concepts", "church, ,dog"], "empty concept"),
    (["--concepts", "church,Church"], "listed twice"),
    (["--concepts", "weird:church"], "kind 'weird'"),
    (["--concepts", "church", "--method", "nope"], "unknown method 'nope'"),
    (["--concepts", "church", "--set", "bogus=1"], "unknown setting 'bogus'"),
    (["--concepts", "church", "--set", "r2=0"], "r2=0 is out of range"),
    (["--concepts", "church", "--set", "r1=1.5"], "r1=1.5 is out of range"),
    (["--concepts", "church", "--set", "alpha=-0.1"], "alpha=-0.1 is out of range"),
    (["--concepts", "church", "--set", "saliency_steps=0"], "saliency_steps=0 is out of range"),
    (["--concepts", "church", "--set", "overrides.church.r2=2"], "overrides.church.r2=2 is out of range"),
    (["--concepts", "church", "--config", "fia-nothing"], "unknown --config"),
    (["--concepts", "church", "--model", "/no/such/model"], "does not exist"),
    (["--concepts", "church", "--model", "someone/not-cached-model"], "not in the local Hugging Face cache"),
    (["--concepts", "church", "--dtype", "float8"], "unknown dtype"),
    (["--concepts", "church", "--dtype", "float16", "--device", "cpu"], "float16 is not supported"),
    (["--concepts", "church", "--device", "cuda:3"] if not __import__("torch").cuda.is_available() else
     ["--concepts", "church", "--device", "mps"], "is not available on this machine"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, match, capsys, tmp_path, model_dir):
    if "--model" not in args:
        args = [*args, "--model", str(model_dir)]
    bad(args, capsys, tmp_path, match)


def test_model_folder_that_is_not_a_pipeline(capsys, tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    bad(["--concepts", "church", "--model", str(folder)], capsys, tmp_path, "not a diffusers pipeline folder")


def test_model_that_is_not_stable_diffusion(capsys, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    folder = tmp_path / "ddpm"
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    bad(["--concepts", "church", "--model", str(folder)], capsys, tmp_path, "is not a model erase can edit")


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", b"not a safetensors file at all"])
def test_corrupt_or_truncated_checkpoint(content, capsys, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    bad(["--concepts", "church", "--model", str(path)], capsys, tmp_path, "corrupt or truncated")


def test_non_empty_out_needs_overwrite(model_dir, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["--concepts", "church", "--model", str(model_dir), "--out", str(out), *FAST])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).parent / "erase-concepts"
    done = subprocess.run([str(script), "--concepts", "a,a"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 2 and "listed twice" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_evaluate_refuses_a_folder_without_a_run(model_dir, capsys, tmp_path):
    out = tmp_path / "report"
    code = main(["evaluate", str(tmp_path), "--model", str(model_dir), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has no erase.json" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_evaluate_names_missing_clip_weights(model_dir, capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["--concepts", "church", "--model", str(model_dir), "--out", str(run), *FAST]) == 0
    capsys.readouterr()
    code = main(["evaluate", str(run), "--model", str(model_dir), "--clip", "ViT-B-32", "--clip-pretrained",
                 "/no/such/weights.bin", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1, err
    assert not (run / "report").exists()


def test_default_run_on_the_mini_world_with_evaluation(tmp_path, capsys):
    """The README's main job: the embedded model by default, then --eval with the mini CLIP."""
    out = tmp_path / "run"
    code = main(["--concepts", "church", "--out", str(out), "--eval", "--retain", "golf ball,van gogh", "--eval-set",
                 "prompts_per_concept=2", "--eval-set", "steps=5", *FAST])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "erase.json").read_text())
    assert record["catalog"] == "mini" and record["concepts"][0]["kind"] == "object"
    report = json.loads((out / "report" / "report.json").read_text())
    settings, metrics = report["settings"], report["metrics"]
    assert settings["clip"]["model"] == "mini" and set(metrics["retain"]) == {"golf ball", "van gogh"}
    assert settings["seeds"] == [0, 1, 2]  # the miniature world's default: its images are cheap
    assert {k: v["scope"] for k, v in metrics["retain_by_kind"].items()} == {"object": "in-kind", "style": "cross-kind"}
    summary = metrics["summary"]
    low, high = summary["retain_accuracy_cross_kind_ci"]
    assert low <= summary["retain_accuracy_cross_kind"] == metrics["retain"]["van gogh"]["erased"] <= high
    parts = [1 - summary["forgetting_accuracy"], summary["retain_accuracy_in_kind"], summary["retain_accuracy_cross_kind"]]
    assert summary["overall"] == pytest.approx(0 if min(parts) == 0 else 3 / sum(1 / p for p in parts))  # both enter
    assert (out / "report" / "grids" / "church.png").is_file() and (out / "run.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "forgetting_accuracy" in printed and "| retain_accuracy_cross_kind |" in printed
    assert printed.splitlines()[-1] == (f"wrote {out}/: README.md, erase.json, patch.safetensors, report/, "
                                        "run.safetensors, unet/")
    assert f"| overall | {summary['overall']:.3f}" in (out / "README.md").read_text()  # the card has the numbers
