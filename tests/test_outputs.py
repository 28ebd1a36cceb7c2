"""Outputs never destroy inputs, follow no links and follow the umask: --out that is, holds or lies inside what a
command reads; a symbolic link at --out or at its lock file; leftovers of live and dead runs; a name too long for
the file system; the permissions of every file a run writes."""

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from erase import EraseError
from erase.cli import main
from erase.export import check_output_dir
from erase.training import TrainingStopped
from erase_lab.bad_inputs import FAST, prepare

ESD = ["--method", "esd", "--set", "steps=2", "--set", "sample_steps=2", "--set", "lr=1e-3", "--quiet"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """model/ (a tiny SD pipeline), lcm/ and run/ (FIA's erasure of church on model/)."""
    folder = tmp_path_factory.mktemp("shared")
    prepare(folder)
    return folder


@pytest.fixture
def run_copy(shared, tmp_path):
    """A copy of the shared run, which a case may try to destroy."""
    return Path(shutil.copytree(shared / "run", tmp_path / "work" / "run"))


def state(*folders: Path) -> dict[str, tuple]:
    """Every path below the folders (links as links) with its size and modification time: what must not change."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns, p.is_symlink()) for folder in folders
            for p in [folder, *folder.rglob("*")] if os.path.lexists(p)}


def refused(argv: list[str], capsys, expect: str, *keep: Path) -> str:
    """The command exits 2 with one line holding `expect`, and every path below `keep` is as it was."""
    before = state(*keep)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("erase-concepts: error:") and expect in err, err
    assert state(*keep) == before
    return err


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- --out never is, holds or lies inside what the command reads ---------------------------------------------------
CASES = {  # name: (argv from the model folder, a copy of the run, a scratch folder; fragment of the refusal)
    "evaluate RUN --out RUN --overwrite": (
        lambda m, r, t: ["evaluate", str(r), "--model", str(m), "--out", str(r), "--overwrite", "--quiet"],
        "is the run folder"),
    "evaluate RUN --out <folder holding RUN> --overwrite": (
        lambda m, r, t: ["evaluate", str(r), "--model", str(m), "--out", str(r.parent), "--overwrite", "--quiet"],
        "holds the run folder"),
    "evaluate RUN --out <inside the model>": (
        lambda m, r, t: ["evaluate", str(r), "--model", str(m), "--out", str(m / "report"), "--quiet"],
        "lies inside --model"),
    "erase --model RUN/run.safetensors --out RUN --overwrite": (
        lambda m, r, t: ["--concepts", "church", "--model", str(r / "run.safetensors"), "--model-config", str(m),
                         "--out", str(r), "--overwrite", *FAST], "holds --model"),
    "erase --model MODEL --out MODEL --overwrite": (
        lambda m, r, t: ["--concepts", "church", "--model", str(m), "--out", str(m), "--overwrite", *FAST],
        "is --model"),
    "erase --model MODEL --out MODEL/erased": (
        lambda m, r, t: ["--concepts", "church", "--model", str(m), "--out", str(m / "erased"), *FAST],
        "lies inside --model"),
    "erase --model-config MODEL --out MODEL/erased": (
        lambda m, r, t: ["--concepts", "church", "--model", str(r / "run.safetensors"), "--model-config", str(m),
                         "--out", str(m / "erased"), *FAST], "lies inside --model-config"),
    "erase --catalog RUN/catalog.yaml --out RUN --overwrite": (
        lambda m, r, t: ["--concepts", "church", "--model", str(m), "--catalog", write(r / "catalog.yaml", "{}"),
                         "--out", str(r), "--overwrite", *FAST], "holds --catalog"),
    "erase --config RUN/fia.yaml --out RUN --overwrite": (
        lambda m, r, t: ["--concepts", "church", "--model", str(m), "--config", write(r / "fia.yaml", "r2: 0.03"),
                         "--out", str(r), "--overwrite", *FAST], "holds --config"),
    "erase --set checkpoint_dir=RUN --out RUN --overwrite": (
        lambda m, r, t: ["--concepts", "church", "--model", str(m), "--set", f"checkpoint_dir={r}", "--out", str(r),
                         "--overwrite", *ESD], "is checkpoint_dir"),
    "apply --patch RUN/patch.safetensors --out RUN --overwrite": (
        lambda m, r, t: ["apply", "--patch", str(r / "patch.safetensors"), "--model", str(m), "--out", str(r),
                         "--overwrite", "--quiet"], "holds --patch"),
    "apply --out <inside the model>": (
        lambda m, r, t: ["apply", "--patch", str(r / "patch.safetensors"), "--model", str(m), "--out",
                         str(m / "erased"), "--quiet"], "lies inside --model"),
    "attack RUN --out RUN": (
        lambda m, r, t: ["attack", str(r), "--model", str(m), "--out", str(r), "--quiet"], "is a run folder"),
    "--out through a link to the folder holding the model": (
        lambda m, r, t: ["--concepts", "church", "--model", str(m), "--out", str(linked(t, m.parent) / m.name),
                         "--overwrite", *FAST], "is --model"),
}


def linked(folder: Path, target: Path) -> Path:
    """A link in `folder` to `target`: a path that names the target by another name."""
    (folder / "link").symlink_to(target)
    return folder / "link"


@pytest.mark.parametrize("name", CASES)
def test_an_out_that_would_replace_or_change_an_input_is_refused(name, shared, run_copy, tmp_path, capsys):
    make, expect = CASES[name]
    refused(make(shared / "model", run_copy, tmp_path), capsys, expect, shared / "model", run_copy.parent)


def test_a_report_inside_its_run_and_a_run_beside_a_single_file_are_allowed(shared, run_copy, tmp_path):
    """evaluate writes <run>/report by default; models/x.safetensors with its erasure in models/x-erased is usual."""
    reads = {"the run folder": run_copy, "--model": run_copy / "run.safetensors"}
    assert check_output_dir(run_copy / "report", False, reads, report_of=run_copy) == run_copy / "report"
    with pytest.raises(EraseError, match="lies inside the run folder"):
        check_output_dir(run_copy / "report", False, reads)  # no report: a folder inside the run is refused
    assert check_output_dir(run_copy.parent / "run-erased", False, reads) == run_copy.parent / "run-erased"


# -- links ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["run", "missing"])
def test_an_out_that_is_a_symbolic_link_is_refused_and_left_as_it_is(target, run_copy, shared, capsys):
    link = run_copy.parent / "out"
    link.symlink_to(run_copy if target == "run" else run_copy.parent / "missing")
    refused(["--concepts", "church", "--model", str(shared / "model"), "--out", str(link), "--overwrite", *FAST],
            capsys, "is a symbolic link", run_copy.parent)


def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_a_link_a_killed_run_moved_aside_is_removed_or_put_back_never_followed(run_copy, shared, tmp_path, capsys):
    """Erase once moved a linked --out aside as .<out>.<pid>.old, then crashed on it: the next run on
    that --out must neither crash nor touch what the link points to."""
    out, work = tmp_path / "out", run_copy.parent
    args = ["--concepts", "church", "--model", str(shared / "model"), "--out", str(out), "--overwrite", *FAST]
    aside = tmp_path / f".out.{dead_pid()}.old"
    aside.symlink_to(run_copy)
    shutil.copytree(shared / "run", out)  # the output that run put in place of the link
    before = state(work)
    assert main(args) == 0, capsys.readouterr().err
    assert f"removed {aside}" in capsys.readouterr().err
    assert not os.path.lexists(aside) and state(work) == before

    shutil.rmtree(out)  # killed between its two renames: the link is put back, and refused as any linked --out
    aside.symlink_to(run_copy)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "restored" in err and "is a symbolic link" in err.splitlines()[-1]
    assert out.is_symlink() and state(work) == before


@pytest.mark.parametrize("target", ["missing", "file"])
def test_a_lock_file_that_is_a_symbolic_link_is_not_followed(target, shared, tmp_path, capsys):
    victim = tmp_path / "victim"
    if target == "file":
        victim.write_text("the user's")
    (tmp_path / ".out.lock").symlink_to(victim)
    refused(["--concepts", "church", "--model", str(shared / "model"), "--out", str(tmp_path / "out"), *FAST], capsys,
            "is a symbolic link, which erase does not follow", tmp_path)
    assert victim.exists() == (target == "file")  # not created through the link


def test_leftovers_of_a_live_process_are_left_alone_with_a_note(shared, tmp_path, capsys):
    live = subprocess.Popen(["sleep", "60"])
    try:
        leftover = tmp_path / f".out.{live.pid}.partial"
        (leftover / "unet").mkdir(parents=True)
        assert main(["--concepts", "church", "--model", str(shared / "model"), "--out", str(tmp_path / "out"),
                     *FAST]) == 0
        assert f"left {leftover} alone: process {live.pid}" in capsys.readouterr().err
        assert (leftover / "unet").is_dir() and (tmp_path / "out" / "erase.json").is_file()
    finally:
        live.kill()
        live.wait()


def test_leftovers_carrying_this_process_id_are_an_earlier_process_s(shared, tmp_path, capsys):
    """In a container every run may get the same pid: what carries ours was left by a killed run, never a live one
    (we hold the lock), and used to make the run fail on creating its own partial folder."""
    leftover = tmp_path / f".out.{os.getpid()}.partial"
    (leftover / "unet").mkdir(parents=True)
    assert main(["--concepts", "church", "--model", str(shared / "model"), "--out", str(tmp_path / "out"), *FAST]) == 0
    assert f"removed {leftover}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- names too long for the file system ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["erase", "apply", "evaluate"])
@pytest.mark.parametrize("length", [250, 300])
def test_an_out_name_too_long_for_the_file_system_is_refused_before_any_work(command, length, shared, tmp_path,
                                                                               capsys):
    out = str(tmp_path / ("n" * length))
    argv = {"erase": ["--concepts", "church", "--model", str(shared / "model"), "--out", out, *FAST],
            "apply": ["apply", "--patch", str(shared / "run" / "patch.safetensors"), "--model", str(shared / "model"),
                      "--out", out, "--quiet"],
            "evaluate": ["evaluate", str(shared / "run"), "--model", str(shared / "model"), "--out", out, "--quiet"]}
    refused(argv[command], capsys, "is too long for the file system", tmp_path, shared / "run")
    assert list(tmp_path.iterdir()) == []


def test_the_longest_name_the_refusal_allows_is_written(shared, tmp_path, capsys):
    """What the refusal advises works: the partial folder and the single file named after --out fit."""
    args = ["--concepts", "church", "--model", str(shared / "model"), *FAST, "--out"]
    err = refused([*args, str(tmp_path / ("n" * 250))], capsys, "too long")
    longest = int(re.search(r"at most (\d+) bytes", err)[1])
    out = tmp_path / ("n" * longest)
    assert main([*args, str(out)]) == 0, capsys.readouterr().err
    assert (out / f"{out.name}.safetensors").is_file()


# -- files follow the umask ----------------------------------------------------------------------------------------
@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022], indirect=True, ids=oct)
def test_every_file_a_run_writes_follows_the_umask(umask, shared, tmp_path, capsys):
    """unet/, the single file, the patch, the LoRA, erase.json and README.md: 0644 under umask 022, as the folders."""
    out = tmp_path / "out"
    assert main(["--concepts", "church", "--model", str(shared / "model"), "--out", str(out), "--method", "uce",
                 "--lora", "2", "--quiet"]) == 0, capsys.readouterr().err
    written = modes(out)
    assert {"unet/diffusion_pytorch_model.safetensors", "unet/config.json", "out.safetensors", "patch.safetensors",
            "out-lora-r2.safetensors", "erase.json", "README.md"} <= set(written)
    assert written == {name: 0o755 if (out / name).is_dir() else 0o644 for name in written}


@pytest.mark.parametrize("umask", [0o022], indirect=True, ids=oct)
def test_a_training_checkpoint_follows_the_umask(umask, pipe, tmp_path):
    import erase

    with pytest.raises(TrainingStopped):
        erase.erase(pipe, "church", method="esd", progress=False, checkpoint_dir=str(tmp_path / "checkpoints"),
                    stop_after=1, checkpoint_every=1, steps=2, sample_steps=2, lr=1e-3)
    assert modes(tmp_path / "checkpoints") == {".": 0o755, "checkpoint.pt": 0o644}


@pytest.mark.parametrize("umask", [0o027], indirect=True, ids=oct)
def test_a_saved_result_follows_any_umask(umask, run, tmp_path):
    written = modes(run[1].save(tmp_path / "run"))
    assert written == {name: 0o750 if (tmp_path / "run" / name).is_dir() else 0o640 for name in written}
