"""Reliability: YAML aliases are bounded, a training checkpoint that is not this run's is refused in one line before
any training data is sampled, and a UCE edit that changes nothing is refused or reported as such."""

import pytest
import torch

import erase
from erase.cli import main
from erase.config import parse_yaml
from erase.training import TRAINER_FIELDS, Checkpoint, TrainingStopped
from erase_lab.bad_inputs import billion_laughs, indented

ESD = {"steps": 2, "sample_steps": 2, "lr": 1e-3}
SALUN = {"steps": 1, "prompts_per_concept": 1, "images_per_prompt": 1, "sample_steps": 2, "batch_size": 1}


def refused(capsys, argv: list[str], expect: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("erase-concepts: error:") and expect in err, err
    return err


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """An empty cache per test: a refusal before any work leaves it empty."""
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- YAML ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def bombs(tmp_path):
    """A method preset and a catalog whose aliases expand to ~4·10⁸ values."""
    bomb = indented(billion_laughs())
    config = tmp_path / "bomb-config.yaml"
    config.write_text(f"method: uce\npreserve:\n{bomb}\n")
    catalog = tmp_path / "bomb-catalog.yaml"
    catalog.write_text(f"neutral:\n{bomb}\n")
    return config, catalog


def test_an_alias_bomb_is_refused_in_one_line_by_the_cli(bombs, tmp_path, capsys):
    config, catalog = bombs
    out = tmp_path / "out"
    refused(capsys, ["--concepts", "church", "--method", "uce", "--config", str(config), "--out", str(out)],
            f"--config {config} uses YAML aliases that expand it to")
    refused(capsys, ["--concepts", "church", "--catalog", str(catalog), "--out", str(out)],
            "write the values out instead of nesting aliases")
    refused(capsys, ["--concepts", "church", "--method", "uce", "--set", "preserve=&a [*a]", "--out", str(out)],
            "has a YAML alias inside its own anchor")
    assert not out.exists()


def test_an_alias_bomb_is_refused_by_the_api(bombs, pipe, cache):
    config, catalog = bombs
    with pytest.raises(erase.EraseError, match="uses YAML aliases that expand it to 4"):
        erase.erase(pipe, "church", method="uce", config=str(config), progress=False)
    with pytest.raises(erase.EraseError, match=f"--catalog {catalog} uses YAML aliases"):
        erase.erase(pipe, "church", method="uce", catalog=str(catalog), progress=False)
    assert not cache.exists()


def test_deep_nesting_is_one_line_and_modest_aliases_still_read():
    with pytest.raises(erase.EraseError, match="nests its values too deeply"):
        parse_yaml("[" * 5000, "--config x")
    shared = parse_yaml("a: &words [church, dog]\nb: *words\nc: {<<: {k: 1}}", "--config x")
    assert shared == {"a": ["church", "dog"], "b": ["church", "dog"], "c": {"k": 1}}
    with pytest.raises(erase.EraseError, match="not valid YAML"):  # !!python tags stay refused (safe_load)
        parse_yaml("a: !!python/object/apply:os.system [echo]", "--config x")


# -- training checkpoints -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("saved", "expect"), [
    ([1, 2, 3], "is not a checkpoint of erase (a list without a run's identity)"),
    ({"step": 3}, "is not a checkpoint of erase (a dict without a run's identity)"),
    ({"identity": {"method": "other"}}, "belongs to another run (different method)"),
    ({"identity": {"method": "esd"}, "step": "3", "losses": [], "state": {}, "params": {}}, "damaged (its step is a str)"),
    ({"identity": {"method": "esd"}, "step": 3, "state": {}, "params": {}}, "damaged (no losses)"),
    ({"identity": {"method": "esd"}, "step": 3, "losses": [], "state": {}, "params": {}, "loop_s": "1"},
     "damaged (its loop_s is a str)"),
])
def test_a_malformed_checkpoint_is_one_line_naming_the_file_and_the_fix(tmp_path, saved, expect):
    path = tmp_path / "checkpoint.pt"
    torch.save(saved, path)
    with pytest.raises(erase.EraseError, match="use another checkpoint_dir or delete it|delete it to start over or use "
                                               "another checkpoint_dir") as refusal:
        Checkpoint(path, {"method": "esd"}, TRAINER_FIELDS).load()
    assert expect in str(refusal.value) and str(path) in str(refusal.value)


def test_an_older_checkpoint_without_its_loop_time_still_resumes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"identity": {"method": "esd"}, "step": 3, "losses": [], "state": {}, "params": {}}, path)
    assert Checkpoint(path, {"method": "esd"}, TRAINER_FIELDS).load()["step"] == 3


def test_a_foreign_checkpoint_is_refused_before_any_training_data_is_sampled(tmp_path, cache, capsys):
    """SalUn samples its training images first (a minute on SD): the checkpoint is checked before that."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    ckpt.mkdir()
    torch.save([1, 2, 3], ckpt / "checkpoint.pt")
    refused(capsys, ["--concepts", "church", "--method", "salun", "--model", "mini", "--out", str(out), "--quiet",
                     "--set", f"checkpoint_dir={ckpt}", *[x for k, v in SALUN.items() for x in ("--set", f"{k}={v}")]],
            f"{ckpt / 'checkpoint.pt'} is not a checkpoint of erase")
    assert not out.exists() and not cache.exists()  # nothing sampled, nothing written
    assert (ckpt / "checkpoint.pt").is_file()  # nor deleted


def test_a_checkpoint_of_this_run_with_damaged_weights_is_refused(pipe, tmp_path):
    with pytest.raises(TrainingStopped):
        erase.erase(pipe, "church", method="esd", progress=False, checkpoint_dir=str(tmp_path), stop_after=1,
                    checkpoint_every=1, **ESD)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    name = next(iter(saved["params"]))
    saved["params"][name] = saved["params"][name][:1]
    torch.save(saved, tmp_path / "checkpoint.pt")
    with pytest.raises(erase.EraseError, match=f"damaged \\({name} is missing or not of shape"):
        erase.erase(pipe, "church", method="esd", progress=False, checkpoint_dir=str(tmp_path), **ESD)


# -- no-op edits --------------------------------------------------------------------------------------------------
def test_uce_with_the_concept_as_its_own_anchor_is_refused_before_the_model_loads(tmp_path, capsys, pipe):
    out = tmp_path / "out"
    refused(capsys, ["--method", "uce", "--concepts", "church=>church", "--model", str(tmp_path / "no-model"),
                     "--out", str(out)], "concept 'church' has itself as anchor, so UCE would change nothing")
    assert not out.exists()
    with pytest.raises(erase.EraseError, match="has itself as anchor"):  # the tokenizer reads case and spaces alike
        erase.erase(pipe, "Church =>  CHURCH", method="uce", progress=False)


def test_an_edit_below_the_dtype_rounding_counts_no_weight_and_says_so(pipe):
    """λ = 10³⁰ keeps every weight's old output: the change is far below float32 rounding. Solving for W itself
    reported nearly every target weight "edited" by the solver's rounding noise."""
    before = erase.fingerprint(pipe.unet)
    result = erase.erase(pipe, "church", method="uce", lam=1e30, progress=False)
    assert result.record["totals"]["edited"] == 0
    assert "this erasure is a no-op" in result.summary()
    with result.applied():
        assert erase.fingerprint(pipe.unet) == before
    edited = erase.erase(pipe, "church", method="uce", progress=False)
    assert edited.record["totals"]["edited"] > 0 and "no-op" not in edited.summary()
