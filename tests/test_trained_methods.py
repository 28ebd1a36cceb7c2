"""SalUn and dynamic masks on the mini world: short runs that must erase, mask strictly, cache their data,
resume to the same weights, and (dynamic) keep a first concept forgotten through distillation."""

import pytest
import torch

import erase
from erase.errors import EraseError
from erase.training import TrainingStopped

QUICK = {"prompts_per_concept": 2, "images_per_prompt": 2, "sample_steps": 10, "batch_size": 2, "lr": 1e-4}
DYNAMIC = {**QUICK, "warmup": 4, "steps": 8, "update_every": 3}


@pytest.fixture(scope="module")
def mini():
    return erase.load_pipeline("mini")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path_factory.getbasetemp() / "erase-cache"))


def same_edit(a, b) -> bool:
    return a.edit.masks.keys() == b.edit.masks.keys() and all(
        torch.equal(a.edit.masks[n], b.edit.masks[n]) and torch.equal(a.edit.values[n], b.edit.values[n])
        for n in a.edit.masks)


def test_salun_moves_only_salient_weights_and_restores_the_pipeline(mini):
    before = erase.fingerprint(mini.unet)
    result = erase.erase(mini, "church", method="salun", progress=False, train="attn2", saliency_fraction=0.2,
                         steps=6, **QUICK)
    assert erase.fingerprint(mini.unet) == before
    trained = sum(p.numel() for n, p in mini.unet.named_parameters() if ".attn2." in n)
    edited = result.record["totals"]["edited"]
    assert 0 < edited <= result.record["saliency_mask"]["trainable"] <= 0.2 * trained + 64  # ties at the threshold
    assert all(".attn2." in name for name in result.edit.masks)
    assert len(result.record["training_curve"]) == 6


def test_salun_remaps_to_the_unedited_model_when_asked_and_resumes_to_the_same_edit(mini, tmp_path):
    settings = {"method": "salun", "progress": False, "remap_target": "original", "steps": 4, **QUICK, "lr": 1e-3}
    fixed = erase.erase(mini, "church", **settings)
    moving = erase.erase(mini, "church", **{**settings, "remap_target": "current"})
    assert not same_edit(fixed, moving)  # the same first step, then the targets part
    with pytest.raises(TrainingStopped):
        erase.erase(mini, "church", **settings, checkpoint_dir=str(tmp_path), stop_after=2, checkpoint_every=2)
    resumed = erase.erase(mini, "church", **settings, checkpoint_dir=str(tmp_path))
    assert resumed.record["resumed_from_step"] == 2 and same_edit(fixed, resumed)  # the target is the base's again
    with pytest.raises(EraseError, match="remap_target"):
        erase.erase(mini, "church", **{**settings, "remap_target": "frozen"})


def test_dynamic_masks_keep_each_layers_density(mini):
    result = erase.erase(mini, "church", method="dynamic", progress=False, density=0.1, **{**DYNAMIC,
                                                                                            "update_every": 100})
    for name, stats in result.edit.stats().items():  # no mask update: at most the initial 10% of a layer moved
        assert stats["edited"] <= 0.1 * stats["numel"] + 1, name


def test_training_data_is_cached_by_model_fingerprint(mini, tmp_path, monkeypatch):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path))
    first = erase.erase(mini, "church", method="salun", progress=False, steps=2, **QUICK)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len({f.parent for f in files}) == 1 and len(files) >= 3  # concept prompts, anchor, rivals
    stamps = [f.stat().st_mtime_ns for f in files]
    again = erase.erase(mini, "church", method="salun", progress=False, steps=2, **QUICK)
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.rglob("*.safetensors"))] == stamps
    assert same_edit(first, again)
    with first.applied():  # other weights, other samples: a new cache folder
        erase.erase(mini, "church", method="salun", progress=False, steps=1, **QUICK)
    assert len({f.parent for f in tmp_path.rglob("*.safetensors")}) == 2


def test_resumed_run_gives_the_weights_of_an_uninterrupted_one(mini, tmp_path):
    settings = {**DYNAMIC, "seed": 3}
    whole = erase.erase(mini, ["church", "golf ball"], method="dynamic", progress=False, **settings)
    with pytest.raises(TrainingStopped, match="resume"):
        erase.erase(mini, ["church", "golf ball"], method="dynamic", progress=False, checkpoint_dir=str(tmp_path),
                    stop_after=15, checkpoint_every=5, **settings)
    assert (tmp_path / "checkpoint.pt").is_file()
    with pytest.raises(EraseError, match="another run"):
        erase.erase(mini, ["church", "golf ball"], method="dynamic", progress=False, checkpoint_dir=str(tmp_path),
                    **{**settings, "lr": 2e-4})
    resumed = erase.erase(mini, ["church", "golf ball"], method="dynamic", progress=False, checkpoint_dir=str(tmp_path),
                          **settings)
    assert resumed.record["training_curve"] == whole.record["training_curve"]
    assert same_edit(whole, resumed)
    assert (whole.record["resumed_from_step"], resumed.record["resumed_from_step"]) == (0, 15)
    assert resumed.record["earlier_attempts_s"] > 0  # the stopped attempt's training time, kept in its checkpoint
    assert not (tmp_path / "checkpoint.pt").exists()  # a finished run leaves no checkpoint to resume by mistake


def drift_of_first_concept(mini, tmp_path, kd_weight: float) -> float:
    """Mean squared change of the first concept's predictions while the second is erased."""
    settings = {**DYNAMIC, "steps": 30, "lr": 3e-4, "kd_weight": kd_weight, "checkpoint_dir": str(tmp_path)}
    per_concept = settings["warmup"] + settings["steps"]
    with pytest.raises(TrainingStopped):
        erase.erase(mini, ["church", "golf ball"], method="dynamic", progress=False, stop_after=per_concept, **settings)
    stage_one = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["params"]
    final = erase.erase(mini, ["church", "golf ball"], method="dynamic", progress=False, **settings)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (8,), generator=gen)
    cond = erase.training.encode(mini, ["a church in a forest", "a photo of a church", "a church", "a church near the beach"] * 2, 32)
    params = dict(mini.unet.named_parameters())
    with torch.no_grad(), final.applied():
        after = mini.unet(x, t, **cond).sample
        saved = {n: params[n].clone() for n in stage_one}
        for n, v in stage_one.items():
            params[n].copy_(v)
        before = mini.unet(x, t, **cond).sample
        for n, v in saved.items():
            params[n].copy_(v)
    return torch.nn.functional.mse_loss(after, before).item()


def test_distillation_keeps_the_first_concept_where_it_was(mini, tmp_path):
    with_kd = drift_of_first_concept(mini, tmp_path / "kd", 1.0)
    without = drift_of_first_concept(mini, tmp_path / "no-kd", 0.0)
    assert with_kd < 0.8 * without, (with_kd, without)


def test_cli_stops_resumes_and_exports_the_training_curve(tmp_path):
    import json

    from erase.cli import STOPPED, main

    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    args = ["--concepts", "church", "--method", "salun", "--out", str(out), "--quiet", "--no-single-file",
            "--set", f"checkpoint_dir={ckpt}", "--set", "steps=4", "--set", "checkpoint_every=2",
            *[x for k, v in QUICK.items() for x in ("--set", f"{k}={v}")]]
    assert main([*args, "--set", "stop_after=2"]) == STOPPED
    assert (ckpt / "checkpoint.pt").is_file() and not out.exists()
    assert main(args) == 0
    record = json.loads((out / "erase.json").read_text())
    assert [list(step) for step in record["training_curve"]] == [["loss", "forget", "retain"]] * 4
    assert (out / "patch.safetensors").is_file() and (out / "unet" / "config.json").is_file()
    mini = erase.load_pipeline("mini")
    patched = erase.apply_patch(mini, out / "patch.safetensors")  # the patch carries the trained values
    assert patched.values and any(v.numel() for v in patched.values.values())


def test_mixed_precision_can_change_between_runs_in_one_process(mini):
    full = erase.erase(mini, "church", method="salun", progress=False, train="attn2", steps=2, **QUICK)
    bf16 = erase.erase(mini, "church", method="salun", progress=False, train="attn2", steps=2, mixed_precision="bf16",
                       **QUICK)
    again = erase.erase(mini, "church", method="salun", progress=False, train="attn2", steps=2, **QUICK)
    assert same_edit(full, again) and not same_edit(full, bf16)  # bf16 autocast really ran


@pytest.mark.parametrize("method", ["salun", "dynamic"])
def test_data_parallel_processes_train_the_same_weights(method, tmp_path):
    """Two processes draw different batches; identical weights afterwards prove the gradients were all-reduced."""
    from ddp_worker import launch_two

    launch_two(method, tmp_path)
    first, second = (torch.load(tmp_path / f"values{rank}.pt", weights_only=True) for rank in (0, 1))
    assert first.keys() == second.keys() and any(v.numel() for v in first.values())
    assert all(torch.equal(first[n], second[n]) for n in first)
