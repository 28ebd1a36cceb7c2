"""Every bad input is one line naming the fix (exit 2) before any work, nothing is left stray, nothing
of the user's is lost, and concurrent runs on one --out are refused. The table is erase_lab/bad_inputs.py's."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import erase
from erase.cli import main
from erase_lab.bad_inputs import CASES, FAST, api_cases, files, prepare, release_locks


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared")
    return folder, prepare(folder)


def assert_refused(code: int, err: str, expect: str, written: set) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("erase-concepts: error:") and expect in err, err
    assert not written, written


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_in_one_line_and_writes_nothing(case, shared, capsys, monkeypatch):
    folder = shared[0] / f"case-{CASES.index(case)}"
    folder.mkdir()
    monkeypatch.chdir(folder)
    argv = case.argv(shared[0], folder)
    before = files(shared[0])
    try:
        code = main(argv)
    finally:
        release_locks()
    assert_refused(code, capsys.readouterr().err, case.expect, files(shared[0]) ^ before)


@pytest.mark.parametrize("index", range(len(api_cases(None))), ids=[name for name, _, _ in api_cases(None)])
def test_api_refuses_what_it_cannot_use(index, shared):
    _, call, expect = api_cases(shared[1])[index]
    with pytest.raises(erase.EraseError, match=expect):
        call()


def test_a_missing_model_is_refused_before_diffusers_is_imported(tmp_path):
    """Checking paths first keeps the refusal as quick as a bad setting's (importing diffusers takes seconds)."""
    code = ("import sys; from erase.cli import main; "
            f"code = main(['--concepts', 'church', '--model', {str(tmp_path / 'none')!r}, '--out', {str(tmp_path / 'o')!r}]); "
            "print(code, 'diffusers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "does not exist" in done.stderr


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """SIGINT while torch is being imported (its library mapped into the process, main() not yet running)."""
    import signal
    import time

    # SIGINT as a terminal delivers it: a test run started in the background (`cmd &`) ignores SIGINT, and its
    # children would inherit that and never see the interrupt.
    proc = subprocess.Popen([sys.executable, "-m", "erase.cli", "--concepts", "church", "--out", str(tmp_path / "run")],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps = Path(f"/proc/{proc.pid}/maps")
    while proc.poll() is None and "libtorch" not in maps.read_text():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["erase-concepts: interrupted; nothing was written"], err
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_an_earlier_run_and_keeps_umask_permissions(shared, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--concepts", "church", "--model", str(shared[0] / "model"), "--out", str(out), *FAST]
    assert main(args) == 0 and main([*args, "--overwrite"]) == 0, capsys.readouterr().err
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, partial or old folder left


def test_leftovers_of_killed_runs_are_cleaned_and_a_moved_aside_run_restored(shared, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    (tmp_path / f".out.{dead.pid}.partial" / "unet").mkdir(parents=True)
    shutil.copytree(shared[0] / "run", tmp_path / f".out.{dead.pid}.old")  # killed between its two renames
    code = main(["--concepts", "church", "--model", str(shared[0] / "model"), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "is not empty" in err  # the restored earlier run is not overwritten without --overwrite
    assert "restored" in err and "removed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((out / "erase.json").read_text())["concepts"][0]["name"] == "church"


def test_an_interrupt_after_the_output_is_in_place_says_so(shared, tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("erase.cli.run_evaluation", interrupted)
    out = tmp_path / "out"
    code = main(["--concepts", "church", "--model", str(shared[0] / "model"), "--out", str(out), "--eval", *FAST])
    *notes, err = capsys.readouterr().err.strip().splitlines()  # notes of the save (the patch warning) come first
    assert code == 130 and err == f"erase-concepts: interrupted; {out}/ had been written completely, nothing else was"
    assert all(line.startswith("note: ") for line in notes), notes
    assert (out / "erase.json").is_file()


def test_a_second_run_on_the_same_out_is_refused_at_once(shared, tmp_path):
    """A real second process, started while the first holds the lock (the first waits on stdin)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from erase.export import reserved; from pathlib "
                               f"import Path\nwith reserved(Path({str(tmp_path / 'out')!r}), False):\n print(flush=True)\n "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    done = subprocess.run([sys.executable, "-m", "erase.cli", "--concepts", "church", "--model",
                           str(shared[0] / "model"), "--out", str(tmp_path / "out"), *FAST],
                          capture_output=True, text=True)
    holder.communicate("")
    assert done.returncode == 2 and "another run is writing" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # the holder removed its lock file


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a small tmpfs")
def test_disk_full_is_one_line_and_leaves_nothing(shared, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size=200k tmpfs {mount} && {sys.executable} -m erase.cli --concepts church "
              f"--model {shared[0] / 'model'} --out {mount / 'out'} {' '.join(FAST)}; echo rc=$?; ls -A {mount}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
    if "mount" in done.stderr and "rc=" not in done.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert "rc=2" in done.stdout and done.stdout.split("rc=2")[1].strip() == "", done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left on device" in lines[0] and "MB" in lines[0], done.stderr


def test_grids_of_concepts_with_alikefile_names_do_not_overwrite_each_other(tmp_path):
    from erase.evaluation.report import file_names

    assert file_names(["retain", "neutral", "🐱", "🐶", "retain"]) == ["retain", "neutral", "concept", "concept-2",
                                                                       "retain-2"]


def test_a_single_file_with_a_shorter_text_encoder_loads_with_its_model_config(tmp_path, capsys):
    """The tokenizer follows the text encoder of --model-config (here 32 positions), so encoding does not fail."""
    from transformers import CLIPTextModel

    from erase.single_file import save_single_file
    from erase_lab.tiny import save_configs, tiny_pipeline

    pipe = tiny_pipeline()
    config = pipe.text_encoder.config
    config.max_position_embeddings = 32
    pipe.register_modules(text_encoder=CLIPTextModel(config))
    save_configs(pipe, tmp_path / "config")
    save_single_file(pipe, tmp_path / "model.safetensors", {"method": "none"})
    code = main(["--concepts", "church", "--model", str(tmp_path / "model.safetensors"), "--model-config",
                 str(tmp_path / "config"), "--out", str(tmp_path / "out"), *FAST])
    assert code == 0, capsys.readouterr().err
