"""The cache as a source of numbers and as a fault point: a cached batch is used only when it holds
exactly what is asked for, else generated again with a note; evaluation refuses an edited UNet before generating
(so nothing wrong is cached); a cache folder that cannot be used is refused before any work, and a write that fails
mid-run is noted and skipped."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import erase
from erase.cli import main
from erase.data import ModelCache, SampleSettings, sample_latents
from erase.evaluation import EvalSettings, evaluate
from erase.models import image_side

SETTINGS = {"retain": ["golf ball"], "prompts_per_concept": 1, "steps": 2, "seeds": [0], "batch_size": 1}
NOTE = "erase: note: cache file {} {}: generating it again"


def evaluated(run, judge, **settings):
    pipe, result, _ = run
    return evaluate(pipe, result, clip=judge, progress=False, **{**SETTINGS, **settings})


@pytest.fixture(scope="module")
def uncached(run, judge):
    return evaluated(run, judge, cache_originals=False)


@pytest.fixture
def unet_calls(run):
    """How often the run's UNet has been called since the test began (generating calls it at every step)."""
    calls = []
    hook = run[0].unet.register_forward_pre_hook(lambda *_: calls.append(1))
    yield calls
    hook.remove()


def batches(cache: Path, kind: str = "images") -> list[Path]:
    return sorted((cache / kind).glob("*/*.safetensors"))


def contents(path: Path) -> tuple[dict, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), f.get_tensor("data").clone()  # not a view of the file, which the test rewrites


def same_contents(files: list[Path], expected: list[tuple[dict, torch.Tensor]]) -> bool:
    return all(contents(f)[0] == record and torch.equal(contents(f)[1], tensor) for f, (record, tensor) in
               zip(files, expected, strict=True))


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_tampered_cache_files_are_generated_again_giving_the_uncached_numbers(run, judge, uncached, tmp_path,
                                                                                monkeypatch, capsys):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path))
    assert evaluated(run, judge).metrics == uncached.metrics
    files = batches(tmp_path)
    assert len(files) == 4  # forget, generality, retain and neutral prompt: one image per batch
    record = json.loads(contents(files[0])[0]["identity"])
    assert record["unet"] == erase.fingerprint(run[0].unet) and record["vae"] == erase.fingerprint(run[0].vae)
    assert {"text_encoder", "sampler", "sampler_config", "prompts", "seeds", "steps", "guidance_scale"} <= set(record)
    side = image_side(run[0])
    assert record["shape"] == [1, side, side, 3] and record["dtype"] == "torch.uint8"

    written, stored = [f.read_bytes() for f in files], [contents(f) for f in files]
    swapped, truncated, replaced = files[:2], files[2], files[3]
    swapped[0].write_bytes(written[1])
    swapped[1].write_bytes(written[0])
    truncated.write_bytes(written[2][:-100])
    save_file({"data": stored[3][1].flip(1).contiguous()}, replaced, metadata=stored[3][0])  # other valid images
    folder = files[0].parent
    dead, live = folder / f"{files[0].stem}.tmp{dead_pid()}", folder / f"{files[1].stem}.tmp{os.getppid()}"
    dead.write_bytes(b"half a batch")
    live.write_bytes(b"a batch being written")
    capsys.readouterr()

    again = evaluated(run, judge)
    notes = capsys.readouterr().err.strip().splitlines()
    assert again.metrics == uncached.metrics
    assert sorted(notes) == sorted([NOTE.format(swapped[0], "holds another batch than asked for"),
                                    NOTE.format(swapped[1], "holds another batch than asked for"),
                                    NOTE.format(truncated, "cannot be read (Error while deserializing header: "
                                                           "incomplete metadata, file not fully covered)"),
                                    NOTE.format(replaced, "was changed since it was written")])
    assert same_contents(files, stored)  # each batch stored again, as first written
    assert not dead.exists() and live.exists()  # a killed writer's leftover is removed, a live one's kept


def test_evaluating_an_edited_unet_is_refused_before_anything_is_generated(run, judge, unet_calls, tmp_path,
                                                                           monkeypatch):
    """Inside `with result.applied()`, and after apply_patch on the result's own pipeline: the base's images would
    be the erased model's (cached as the base's, or the edit applied twice)."""
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path))
    pipe, result, folder = run
    with result.applied() as applied, pytest.raises(erase.EraseError, match=r"^the erasure's edit is applied right "
                                                                           r"now \(inside `with result.applied\(\)`\)"):
        evaluate(applied, result, clip=judge, progress=False, **SETTINGS)
    patched = erase.apply_patch(pipe, folder / "patch.safetensors")
    try:
        with pytest.raises(erase.EraseError, match="was made from base .* e.g. by erase.apply_patch"):
            evaluate(pipe, result, clip=judge, progress=False, **SETTINGS)
        with pytest.raises(erase.EraseError, match="was made from base"):  # the attacks check the same way
            erase.attack(pipe, result, clip=judge, progress=False, steps=1)
    finally:
        patched.restore(pipe.unet)
    assert unet_calls == [] and not any(tmp_path.iterdir())


def test_an_unusable_cache_folder_is_refused_before_any_work(run, judge, unet_calls, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    fix = "set ERASE_CACHE to a writable folder or turn the cache off with cache_originals=false"
    under = blocker / "cache"
    for cache, why in [(blocker, f"the cache folder {blocker} (ERASE_CACHE) is a file: {fix}"),
                       (under, f"the cache folder {under} (ERASE_CACHE) cannot be created: {blocker} is a file: {fix}")]:
        monkeypatch.setenv("ERASE_CACHE", str(cache))
        with pytest.raises(erase.EraseError, match=re.escape(why)):
            evaluated(run, judge)
        with pytest.raises(erase.EraseError, match=f"^the cache folder {re.escape(str(cache))} .*is a file"):
            erase.erase(run[0], "church", method="salun", progress=False)  # training data is cached too
        assert unet_calls == []
        for argv in (["--eval"], ["--method", "salun"]):  # refused before the model loads, nothing written
            code = main(["--concepts", "church", "--out", str(tmp_path / "out"), "--quiet", *argv])
            err = capsys.readouterr().err
            assert code == 2 and len(err.splitlines()) == 1 and "set ERASE_CACHE to a writable folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
    EvalSettings(cache_originals=False).validate()  # the way around it for an evaluation


def test_a_cache_write_failing_mid_run_is_noted_once_and_the_run_goes_on(run, judge, uncached, tmp_path,
                                                                         monkeypatch, capsys):
    """Here the images' folder is a file, as a disk that fills up or a folder gone read-only fails each write."""
    (tmp_path / "images").write_text("")
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path))
    capsys.readouterr()
    report = evaluated(run, judge)
    notes = capsys.readouterr().err.strip().splitlines()
    assert report.metrics == uncached.metrics
    assert len(notes) == 1 and notes[0].startswith("erase: note: cannot write the cache in ") and notes[0].endswith(
        "going on without caching"), notes


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a read-only HOME and a small tmpfs")
def test_read_only_home_is_refused_up_front_and_a_full_cache_disk_is_noted(tmp_path):
    """Through the CLI, as a user meets them: a read-only HOME with the default cache, then a cache disk with no
    room for one batch (the erasure and its report are written all the same)."""
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    cache.mkdir()
    script = f"""
import os, sys
from erase.cli import main
from erase.data import ModelCache, SampleSettings, sample_latents
args = ["--concepts", "church", "--eval", "--retain", "", "--eval-set", "steps=2", "--eval-set", "prompts_per_concept=1",
        "--eval-set", "seeds=[0]", "--set", "prompts_per_concept=2", "--set", "saliency_steps=2", "--quiet"]
os.environ.pop("ERASE_CACHE", None)
print("rc", main([*args, "--out", "{tmp_path / 'refused'}"]), file=sys.stderr, flush=True)
os.environ["ERASE_CACHE"] = "{cache}"
print("rc", main([*args, "--out", "{tmp_path / 'run'}"]), file=sys.stderr, flush=True)
"""
    mounts = (f"mount --bind {home} {home} && mount -o remount,bind,ro {home} && "
              f"mount -t tmpfs -o size=4k tmpfs {cache}")
    env = dict(os.environ, HOME=str(home), HF_HUB_OFFLINE="1")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f'{mounts} && exec "$0" -c "$1"', sys.executable, script],
                          capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    if "mount" in done.stderr and "rc" not in done.stderr:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    lines = [line for line in done.stderr.splitlines() if line.startswith(("erase", "rc"))]
    assert lines[0] == (f"erase-concepts: error: the cache folder {home}/.cache/erase (the default: ERASE_CACHE is "
                        f"unset) cannot be created: {home} is not writable: set ERASE_CACHE to a writable folder or "
                        "turn the cache off with cache_originals=false (--eval-set cache_originals=false)"), done.stderr
    assert lines[1] == "rc 2" and not (tmp_path / "refused").exists()
    assert lines[2].startswith(f"erase: note: cannot write the cache in {cache}/images/") and lines[2].endswith(
        "(No space left on device): going on without caching"), done.stderr
    assert lines[3:] == ["rc 0"], done.stderr
    assert (tmp_path / "run" / "report" / "report.json").is_file() and (tmp_path / "run" / "erase.json").is_file()


def test_swapped_training_data_is_sampled_again(run, tmp_path, monkeypatch, capsys):
    """The training methods' latents (SalUn, dynamic masks) go through the same checks."""
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path))
    pipe = run[0]
    prompts, settings = [("a church", None), ("a golf ball", "a church")], SampleSettings(1, 2, 7.5, None, 0)
    first = sample_latents(pipe, prompts, settings, ModelCache("latents", pipe), progress=False)
    files = batches(tmp_path, "latents")
    written, stored = [f.read_bytes() for f in files], [contents(f) for f in files]
    files[0].write_bytes(written[1])
    files[1].write_bytes(written[0])
    capsys.readouterr()
    again = sample_latents(pipe, prompts, settings, ModelCache("latents", pipe), progress=False)
    assert sorted(capsys.readouterr().err.strip().splitlines()) == sorted(
        NOTE.format(f, "holds another batch than asked for") for f in files)
    assert same_contents(files, stored)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
