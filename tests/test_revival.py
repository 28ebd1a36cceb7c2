"""Revival of pruned concepts ("Roots Beneath the Cut") and the noise-filled masks that leave nothing to revive:
the completion itself, what the attack edits, and what each fill leaves an attacker to find."""

import json

import pytest
import torch

import erase
from erase.attacks.revival import soft_impute
from erase.cli import main
from erase.errors import EraseError
from erase.mini import world
from erase.saliency import noise_fill
from erase_lab.tiny import tiny_pipeline

FAST = {"prompts_per_concept": 2, "saliency_steps": 2}
ATTACK = {"prompts_per_concept": 1, "seeds": [0], "sample_steps": 2}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def zeros(pipe):
    return erase.erase(pipe, "church", progress=False, fill="zeros", **FAST)


@pytest.fixture(scope="module")
def noise(pipe):
    return erase.erase(pipe, "church", progress=False, **FAST)  # the default fill


def test_soft_impute_recovers_the_missing_entries_of_a_low_rank_matrix():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(60, 3, generator=generator) @ torch.randn(3, 40, generator=generator)
    missing = torch.rand(60, 40, generator=generator) < 0.1
    completed = soft_impute(matrix.masked_fill(missing, 0), missing, rank=10, iterations=200, tolerance=1e-6)
    assert torch.equal(completed[~missing], matrix[~missing])  # observed entries are kept as they are
    error = (completed - matrix)[missing].norm() / matrix[missing].norm()
    mean_fill = (matrix[missing] - matrix[~missing].mean()).norm() / matrix[missing].norm()
    assert error < 0.2 < mean_fill, (error, mean_fill)


def test_noise_fill_leaves_no_zeros_where_it_masks_and_draws_from_each_rows_weights(pipe, zeros, noise):
    assert noise.edit.masks.keys() == zeros.edit.masks.keys()
    assert all(torch.equal(noise.edit.masks[n], zeros.edit.masks[n]) for n in zeros.edit.masks)  # same neurons
    assert noise.record["config"]["fill"] == "noise" and zeros.edit.values is None
    params = dict(pipe.unet.named_parameters())
    before = {name: params[name].detach().clone() for name in noise.edit.masks}
    with noise.applied():
        for name, mask in noise.edit.masks.items():
            weight = params[name].detach()
            assert not torch.any(weight[mask] == 0), name
            assert torch.equal(weight[~mask], before[name][~mask]), name
            rows = mask.any(1)
            kept_std = before[name][rows].std(1)  # each masked row's draws are on its weights' scale
            assert (weight[mask].abs().max() < 6 * kept_std.max()), name
    again = erase.erase(pipe, "church", progress=False, **FAST)
    assert all(torch.equal(again.edit.values[n], noise.edit.values[n]) for n in noise.edit.values)
    other = noise_fill(params, noise.edit.masks, seed=1)  # the seed draws the values
    assert all(torch.equal(noise_fill(params, noise.edit.masks, noise.config.seed)[n], v)
               for n, v in noise.edit.values.items())
    assert any(not torch.equal(other[n], v) for n, v in noise.edit.values.items() if v.numel())
    with pytest.raises(EraseError, match="fill='holes' is unknown: use one of zeros, noise"):
        erase.erase(pipe, "church", progress=False, fill="holes", **FAST)


def revived_edit(pipe, result, **settings):
    from erase.attacks.core import attack_config
    from erase.attacks.revival import run

    return run(pipe, result.edit, [], attack_config("revival", None, **settings), progress=False)[1]


def test_revival_fills_the_zeros_of_a_pruned_erasure_with_completed_signs_at_row_max_magnitudes(pipe, zeros):
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    revived = revived_edit(pipe, zeros)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())  # left as it was
    pruned = sum(int(m.sum()) for m in zeros.edit.masks.values())
    assert pruned > 0 and sum(int(m.sum()) for m in revived.masks.values()) == pruned  # the tiny UNet has no zeros
    nonzero = 0
    for name, mask in zeros.edit.masks.items():
        assert torch.equal(revived.masks[name], mask)
        values, rows = revived.values[name], mask.nonzero()[:, 0]
        kept = before[name].abs().masked_fill(mask, 0).amax(1)[rows]
        signed = values != 0
        assert torch.all(values[signed].abs() >= kept[signed]), name  # at least the row's largest kept weight
        nonzero += int(signed.sum())
    assert 0.55 * pruned <= nonzero <= 0.65 * pruned  # the top 60% of completed magnitudes keep their signs


def test_noise_fill_leaves_no_location_to_revive_but_the_patch_gives_them_away(pipe, noise):
    nothing = revived_edit(pipe, noise)  # no exact zeros to find: the erased model as it is
    assert all(torch.equal(nothing.masks[n], m) and torch.equal(nothing.values[n], noise.edit.values[n])
               for n, m in noise.edit.masks.items())
    from_patch = revived_edit(pipe, noise, locations="patch")
    assert all(torch.equal(from_patch.masks[n], m) for n, m in noise.edit.masks.items())


def test_revival_attack_reports_like_every_attack_kind(pipe, zeros, judge):
    report = erase.attack(pipe, zeros, kind="revival", clip=judge, progress=False, **ATTACK)
    assert report.settings["kind"] == "revival" and report.settings["top_ratio"] == 0.6
    pruned = sum(int(m.sum()) for m in zeros.edit.masks.values())
    assert [r["words"] for r in report.records] == [f"{pruned} weights revived"]
    assert [r["revived"] for r in report.records] == [pruned]
    assert report.records[0]["attacked_prompt"] == report.records[0]["prompt"]  # the weights change, not the prompt
    assert 0 <= report.metrics["concepts"]["church"]["attack_success_rate"] <= 1


def test_the_patch_is_optional_and_the_console_says_it_is_a_map(tmp_path, capsys):
    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model, safe_serialization=True)
    args = ["--concepts", "church", "--model", str(model), "--no-single-file", "--quiet",
            *(f"--set={k}={v}" for k, v in FAST.items())]
    assert main([*args, "--out", str(tmp_path / "with")]) == 0
    assert "keep the patch private" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "without"), "--no-patch"]) == 0
    out, err = capsys.readouterr()
    assert "keep the patch private" not in err and "patch.safetensors" not in out.splitlines()[-1]
    assert not (tmp_path / "without" / "patch.safetensors").exists()
    assert json.loads((tmp_path / "without" / "erase.json").read_text())["patch"] is None
    with pytest.raises(EraseError, match="saved without its patch"):
        erase.evaluate(tiny_pipeline(), tmp_path / "without", progress=False)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    import os

    os.environ["ERASE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return erase.load_pipeline("mini")


def test_on_the_miniature_world_revival_completes_the_pruned_zeros_and_finds_only_the_models_own_in_noise(mini):
    """BENCHMARKS.md's revival table (fia, church), same settings and seeds. Whether the completed weights bring
    church back depends on the model (earlier miniature models: from none to 2 of 8 images; the shipped one: none
    beyond the 1 of 8 its erasure keeps, at the snow, as zeroing church's own neurons does), so that is measured there,
    not asserted here; what holds on any model is what revival finds to fill: the pruned zeros, and the exact zeros
    the model had already (an attacker cannot tell them apart; one earlier model's float16 weights held one), which
    are all it finds in a noise fill: with none, the noised model's own images."""
    from erase.attacks.revival import pruned_zeros

    own = sum(int(pruned_zeros(p.detach()).sum()) for n, p in mini.unet.named_parameters() if n.endswith("ff.net.2.weight"))
    settings = {"prompts_per_concept": 4, "seeds": [0, 1]}
    pruned = erase.erase(mini, "church", config="fia-object", fill="zeros", progress=False)
    revived = erase.attack(mini, pruned, kind="revival", progress=False, **settings)
    church = revived.metrics["concepts"]["church"]
    assert revived.records[0]["words"] == f"{pruned.record['totals']['edited'] + own} weights revived"
    assert church["original"] >= 0.5 and church["erased"] < church["original"] and church["anchor"] == 0, church

    noised = erase.erase(mini, "church", config="fia-object", progress=False)  # the default fill
    found = erase.attack(mini, noised, kind="revival", progress=False, **settings)
    assert found.records[0]["words"] == f"{own} weights revived"
    church = found.metrics["concepts"]["church"]
    assert church["erased"] < church["original"] and church["attack_success_rate"] == church["erased"], church


def test_on_the_miniature_world_revival_brings_back_what_conceptprune_zeroed_from_ten_classes(mini):
    """BENCHMARKS.md's revival table (conceptprune, the 10 Imagenette classes, zeros), same settings and seeds: the
    attacker with the checkpoint alone brought the classes back in 5% to 35% of the images on the miniature models
    so far (0% to 3% erased; this test, with the process's default threads, measured 7.5% on one: an image moves).
    How much comes back depends on the
    model; that anything does, beyond what the erasure left, is what exact zeros give away."""
    pruned = erase.erase(mini, list(world.TAUGHT_OBJECTS), method="conceptprune", fill="zeros", progress=False)
    revived = erase.attack(mini, pruned, kind="revival", progress=False, prompts_per_concept=2, seeds=[0, 1])
    summary = revived.metrics["summary"]
    assert summary["erased"] <= 0.05 and summary["original"] >= 0.5, summary
    assert summary["attack_success_rate"] > summary["erased"], summary
