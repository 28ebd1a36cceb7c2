"""The prompt attack: its mechanics on tiny SD and SDXL pipelines with a tiny judge (prompts found, report files,
grids, merging with an evaluation, refusals), and on the miniature world what a user checks: a weak erasure
gives the concept back under attack more often than the unedited model draws it from the concept's anchor, and
the same seed finds the same prompts."""

import json

import pytest
import torch

import erase
from erase.attacks import ATTACKS, AttackReport
from erase.cli import main
from erase.evaluation import evaluate
from erase.evaluation.report import CELL, LABEL_WIDTH
from erase_lab.tiny import tiny_pipeline, tiny_sdxl_pipeline

TINY = {"prompts_per_concept": 2, "seeds": [0, 1], "sample_steps": 2, "steps": 3, "tokens": 2}


def test_prompt_attack_finds_typeable_prompts_and_adds_them_to_the_report(run, judge, tmp_path):
    pipe, result, folder = run
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    report = erase.attack(pipe, result, clip=judge, progress=False, **TINY)
    assert "prompt" in ATTACKS and isinstance(report, AttackReport)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())  # the edit is restored
    church = report.metrics["concepts"]["church"]
    assert church["prompts"] == 4 and 0 <= church["attack_success_rate"] <= 1
    low, high = church["attack_success_rate_ci"]
    assert low <= church["attack_success_rate"] <= high
    assert church["attack_success_rate"] == sum(r["success"] for r in report.records) / 4
    assert all(r["success"] == ("a photo of a church" in (r["erased_class"], r["attacked_class"]))
               for r in report.records)
    for record in report.records:  # the prompt, then `tokens` whole words that tokenize back to themselves
        words = record["words"].split()
        assert record["attacked_prompt"] == f"{record['prompt']} {record['words']}" and len(words) == 2
        assert len(pipe.tokenizer(record["words"], add_special_tokens=False).input_ids) == 2
    assert report.settings["steps"] == 3 and report.settings["seeds"] == [0, 1] and report.settings["seed"] == 0
    assert report.grid("church").size == (LABEL_WIDTH + 3 * CELL, 20 + 4 * CELL)

    # Added beside an evaluation, which stays; attacking again replaces the attack's section, not appends one.
    out = evaluate(pipe, folder, retain=[], clip=judge, progress=False, prompts_per_concept=2, steps=2,
                   seeds=[0]).save(tmp_path / "report")
    report.save(out)
    report.save(out)
    saved = json.loads((out / "report.json").read_text())
    assert "forget" in saved["metrics"] and saved["attack"]["prompt"]["metrics"] == report.metrics
    assert [p["attacked_prompt"] for p in saved["attack"]["prompt"]["prompts"]] == \
        [r["attacked_prompt"] for r in report.records]
    text = (out / "report.md").read_text()
    assert text.count("## Attack: prompt") == 1 and "## Forgetting" in text and "| attack success rate |" in text
    assert (out / "grids" / "attack-prompt-church.png").is_file() and (out / "grids" / "church.png").is_file()


def test_prompt_attack_runs_on_sdxl(judge):
    sdxl = tiny_sdxl_pipeline()
    result = erase.erase(sdxl, "church", progress=False, prompts_per_concept=2, saliency_steps=2)
    report = erase.attack(sdxl, result, clip=judge, progress=False, **{**TINY, "seeds": [0]})
    assert report.metrics["concepts"]["church"]["prompts"] == 2 and len(report.images[2]) == 2


def test_refusals_before_any_work(run, judge, tmp_path):
    pipe, result, folder = run
    with pytest.raises(erase.EraseError, match="unknown attack kind 'jailbreak'"):
        erase.attack(pipe, result, kind="jailbreak", clip=judge, progress=False)
    with pytest.raises(erase.EraseError, match="locations='checkpoint' is unknown: use one of zeros, patch"):
        erase.attack(pipe, result, kind="revival", clip=judge, progress=False, locations="checkpoint")
    with pytest.raises(erase.EraseError, match="concept 'dog' was not erased by this run"):
        erase.attack(pipe, result, concepts=["dog"], clip=judge, progress=False)
    with pytest.raises(erase.EraseError, match="unknown setting 'budget'"):
        erase.attack(pipe, result, clip=judge, progress=False, budget=3)
    with pytest.raises(erase.EraseError, match=r"tokens=0 is out of range"):
        erase.attack(pipe, result, clip=judge, progress=False, tokens=0)
    with pytest.raises(erase.EraseError, match=r"would reach \d+ tokens"):
        erase.attack(pipe, result, clip=judge, progress=False, tokens=70)
    with pytest.raises(erase.EraseError, match="made from base"):
        erase.attack(tiny_pipeline(seed=1), result, clip=judge, progress=False)
    report = erase.attack(pipe, result, clip=judge, progress=False, **{**TINY, "prompts_per_concept": 1, "seeds": [0]})
    with pytest.raises(erase.EraseError, match="is a run folder, not a report folder"):
        report.save(folder)
    other = erase.erase(pipe, "golf ball", progress=False, prompts_per_concept=2, saliency_steps=2)
    evaluate(pipe, other, retain=[], clip=judge, progress=False, prompts_per_concept=1, steps=2,
             seeds=[0]).save(tmp_path / "other")
    with pytest.raises(erase.EraseError, match="holds the report of another erasure"):
        report.save(tmp_path / "other")


MINI_ATTACK = {"prompts_per_concept": 2, "seeds": [0, 1], "steps": 20}  # at the mini guidance


def test_a_weak_erasure_gives_the_concept_back_under_attack_and_the_same_seed_finds_the_same_prompts(mini):
    # FIA at a fifth of its r2 leaves tench in 3 of 4 prompts and the attack in all 4 (the shipped mini model draws
    # church, this test's concept before, in only 1 of these 4 original images); 30 steps of esd-mini, weak on the
    # first miniature model, erase beyond any attack on later ones
    weak = erase.erase(mini, "tench", r2=0.002, progress=False)
    first = erase.attack(mini, weak, progress=False, **MINI_ATTACK)
    tench = first.metrics["concepts"]["tench"]
    assert tench["original"] >= 0.5, tench
    assert tench["attack_success_rate"] > tench["anchor"], tench  # more than the judge's floor
    again = erase.attack(mini, weak, progress=False, **MINI_ATTACK)
    assert [r["attacked_prompt"] for r in again.records] == [r["attacked_prompt"] for r in first.records]
    assert again.metrics == first.metrics


def test_cli_attack_writes_into_the_runs_report(mini, tmp_path, capsys):
    run = tmp_path / "run"
    fast = ["--set", "prompts_per_concept=2", "--set", "saliency_steps=2", "--quiet"]
    assert main(["--concepts", "church", "--out", str(run), "--no-single-file", *fast]) == 0
    capsys.readouterr()
    attack = ["attack", str(run), "--set", "prompts_per_concept=1", "--set", "seeds=[0]", "--set", "steps=2",
              "--set", "sample_steps=5", "--quiet"]
    assert main(attack) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "| church | object | 1 |" in printed
    assert printed.splitlines()[-1] == f"wrote {run / 'report'}/: grids/, report.json, report.md"
    saved = json.loads((run / "report" / "report.json").read_text())["attack"]["prompt"]
    assert saved["settings"]["steps"] == 2 and saved["settings"]["clip"]["model"] == "mini"
    for args, match in ((["--set", "bogus=1"], "unknown setting 'bogus'"), (["--concepts", "dog"], "was not erased"),
                        (["--kind", "nope"], "unknown attack kind 'nope'"), (["--out", str(run)], "is a run folder")):
        assert main([*attack, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
