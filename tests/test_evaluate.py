"""The evaluator's mechanics on a tiny pipeline with a tiny (untrained) open_clip judge: pairing, determinism,
files, grids, retention scopes, intervals and refusals; KID with the mini judge on the world's own renders.
Whether it measures forgetting is tested on the miniature world."""

import importlib.util
import json

import numpy as np
import PIL.Image
import pytest
import torch

import erase
from erase.evaluation import Judge, evaluate
from erase.evaluation.report import CELL, LABEL_WIDTH
from erase.evaluation.stats import Bootstrap, kid
from erase.mini import world
from erase_lab.tiny import tiny_pipeline

SETTINGS = {"prompts_per_concept": 2, "steps": 2, "seeds": [0, 1]}


def test_report_files_and_grid(run, judge, tmp_path):
    pipe, result, _ = run
    report = evaluate(pipe, result, retain=["golf ball"], clip=judge, progress=False, **SETTINGS)
    summary = report.metrics["summary"]
    assert 0 <= summary["forgetting_accuracy"] <= 1 and 0 <= summary["retain_accuracy_in_kind"] <= 1
    assert set(report.metrics["forget"]) == {"church"} and set(report.metrics["retain"]) == {"golf ball"}
    out = report.save(tmp_path / "report")
    saved = json.loads((out / "report.json").read_text())
    assert saved["settings"]["seeds"] == [0, 1] and saved["settings"]["clip"]["model"] == "tiny-random"
    assert saved["settings"]["sampler"] == "PNDMScheduler" and saved["settings"]["steps"] == 2
    assert "| forgetting_accuracy |" in (out / "report.md").read_text()
    grid = report.grid("church")
    forget_rows = 2 * 2  # prompts × seeds
    assert grid.size == (LABEL_WIDTH + 2 * CELL, 20 + CELL * forget_rows)
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["church.png", "neutral.png", "retain.png"]
    assert not pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2].weight.eq(0).any()  # restored


def intervals(metrics: dict, path: str = ""):
    """(name, value, interval) of every number in the metrics that has an interval."""
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from intervals(value, f"{path}{key}.")
        elif f"{key}_ci" in metrics:
            yield path + key, value, metrics[f"{key}_ci"]


def test_cross_kind_retention_is_reported_per_kind_and_enters_overall(run, judge, tmp_path):
    pipe, result, _ = run
    report = evaluate(pipe, result, clip=judge, progress=False, max_retain=2, max_cross_retain=2, **SETTINGS)
    m = report.metrics
    # church is an object: other objects are in-kind, artists cross-kind; explicit concepts are never generated
    # unless asked for
    assert {k: (v["scope"], v["concepts"]) for k, v in m["retain_by_kind"].items()} == {
        "object": ("in-kind", 2), "style": ("cross-kind", 2)}
    s = m["summary"]
    assert s["retain_accuracy_in_kind"] == m["retain_by_kind"]["object"]["erased"]
    assert s["retain_accuracy_cross_kind"] == m["retain_by_kind"]["style"]["erased"]
    parts = [1 - s["forgetting_accuracy"], s["retain_accuracy_in_kind"], s["retain_accuracy_cross_kind"]]
    assert s["overall"] == pytest.approx(0 if min(parts) == 0 else 3 / sum(1 / p for p in parts))
    text = (report.save(tmp_path / "report") / "report.md").read_text()
    assert "| style | cross-kind | 2 |" in text and "| retain_accuracy_cross_kind |" in text


def test_every_accuracy_has_an_interval_around_it_and_the_settings_behind_it(run, judge, tmp_path):
    pipe, result, _ = run
    report = evaluate(pipe, result, retain=["golf ball", "van gogh"], clip=judge, progress=False, **SETTINGS)
    found = {name: (value, ci) for name, value, ci in intervals(report.metrics)}
    assert {"summary.forgetting_accuracy", "summary.retain_accuracy_in_kind", "summary.retain_accuracy_cross_kind",
            "summary.overall", "forget.church.erased", "forget.church.generality", "retain.van gogh.original",
            "retain_by_kind.style.erased", "fidelity.paired_similarity"} <= set(found)
    for name, (value, (low, high)) in found.items():
        assert low - 1e-9 <= value <= high + 1e-9, (name, value, low, high)
    saved = json.loads((report.save(tmp_path / "report") / "report.json").read_text())["settings"]
    assert {k: saved[k] for k in ("bootstrap_samples", "bootstrap_seed", "confidence", "seeds")} == {
        "bootstrap_samples": 1000, "bootstrap_seed": 0, "confidence": 0.95, "seeds": [0, 1]}
    assert "95% bootstrap intervals" in (tmp_path / "report" / "report.md").read_text()


def test_unset_seeds_and_guidance_come_from_the_models_profile(pipe):
    """The shipped miniature model carries its own defaults (erase_profile.json); a model without one, such as a
    pipeline built in memory, gets Stable Diffusion's."""
    from erase.evaluation import EvalSettings
    from erase.profile import profile_of

    mini = erase.load_pipeline("mini")
    assert profile_of(mini) == profile_of("mini") and profile_of(mini).catalog == "mini"
    for model, seeds, guidance in ((mini, [0, 1, 2], 2.0), (pipe, [0], 7.5)):
        config = EvalSettings()
        config.fill_defaults(profile_of(model))
        assert (config.seeds, config.guidance_scale) == (seeds, guidance)
    config = EvalSettings(seeds=[5], guidance_scale=3.0)
    config.fill_defaults(profile_of(mini))
    assert (config.seeds, config.guidance_scale) == ([5], 3.0)
    with pytest.raises(erase.EraseError, match="guidance_scale=-1"):
        evaluate(mini, mini, guidance_scale=-1, progress=False)


def test_intervals_narrow_with_more_seeds(run, judge):
    pipe, result, _ = run
    widths = []
    for seeds in ([0, 1], list(range(8))):
        report = evaluate(pipe, result, retain=[], clip=judge, progress=False, **{**SETTINGS, "seeds": seeds})
        low, high = report.metrics["fidelity"]["clip_score_erased_ci"]  # the tiny edit leaves similarity at 1
        widths.append(high - low)
    assert widths[1] < 0.75 * widths[0], widths
    few, many = Bootstrap(1000, 0).mean([1, 0] * 10), Bootstrap(1000, 0).mean([1, 0] * 100)
    assert few.value == many.value == 0.5
    assert np.diff(many.interval(0.95)) < 0.5 * np.diff(few.interval(0.95))


def test_kid_is_zero_for_identical_sets_and_grows_with_a_clearly_different_set():
    judge = Judge.load("mini")

    def features(place: str, seed: int):
        rng = np.random.default_rng(seed)
        scenes = [world.Scene(object=world.BASE_OBJECTS[i % 15], place=place) for i in range(24)]
        return judge.image_features([PIL.Image.fromarray(world.render(scene, rng)) for scene in scenes])

    forests, other_forests, beaches = features("forest", 0), features("forest", 1), features("beach", 0)
    assert kid(forests, forests) == 0
    assert abs(kid(forests, other_forests)) < 0.1 * kid(forests, beaches)


def test_same_seeds_give_identical_numbers_and_run_folder_equals_result(run, judge):
    pipe, result, folder = run
    first = evaluate(pipe, result, retain=["golf ball"], clip=judge, progress=False, **SETTINGS)
    second = evaluate(pipe, folder, retain=["golf ball"], clip=judge, progress=False, **SETTINGS)
    assert first.metrics == second.metrics
    assert first.records == second.records


def test_paired_images_share_seeds_and_differ_by_the_edit(run, judge):
    pipe, result, _ = run
    report = evaluate(pipe, result, retain=[], clip=judge, progress=False, **SETTINGS)
    original, erased = report.images
    assert len(original) == len(erased) == len(report.records)
    with result.applied():
        again = pipe(report.records[0]["prompt"], num_inference_steps=2,
                     generator=torch.Generator().manual_seed(report.records[0]["seed"])).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(erased[0]))


def test_refusals(run, judge, tmp_path):
    pipe, result, folder = run
    with pytest.raises(erase.EraseError, match="made from base"):
        evaluate(tiny_pipeline(seed=1), result, clip=judge, progress=False, **SETTINGS)
    with pytest.raises(erase.EraseError, match="has no erase.json"):
        evaluate(pipe, tmp_path, clip=judge, progress=False, **SETTINGS)
    with pytest.raises(erase.EraseError, match="unknown CLIP model 'ViT-Nope'"):
        evaluate(pipe, result, clip="ViT-Nope", progress=False, **SETTINGS)
    with pytest.raises(erase.EraseError, match=r"max_cross_retain=-1 is out of range: it must be a whole number ≥ 0"):
        evaluate(pipe, result, clip=judge, progress=False, max_cross_retain=-1, **SETTINGS)
    with pytest.raises(erase.EraseError, match=r"confidence=1.5 is out of range: it must lie in \(0, 1\), e.g. 0.95"):
        evaluate(pipe, result, clip=judge, progress=False, confidence=1.5, **SETTINGS)
    if importlib.util.find_spec("nudenet") is None:  # the `nudity` extra is not part of the test install
        with pytest.raises(erase.EraseError, match="NudeNet is not installed"):
            evaluate(pipe, result, clip=judge, progress=False, nudity=True, **SETTINGS)


def test_original_images_come_back_from_the_cache_exactly_as_generated(run, judge, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("ERASE_CACHE", str(tmp_path))
    pipe, result, _ = run
    fresh = evaluate(pipe, result, retain=["golf ball"], clip=judge, progress=False, cache_originals=False, **SETTINGS)
    assert not (tmp_path / "images").exists()
    stored = evaluate(pipe, result, retain=["golf ball"], clip=judge, progress=False, **SETTINGS)
    batches = sorted((tmp_path / "images").glob("*/*.safetensors"))
    assert batches and stored.settings["original_images_cache"] == str(batches[0].parent)
    for a, b in zip(fresh.images[0] + fresh.images[1], stored.images[0] + stored.images[1], strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert stored.metrics == fresh.metrics

    # Images put in the cache by hand (here: made black) are not the batch asked for: generated again, not used.
    for batch in batches:
        save_file({"data": load_file(batch)["data"] * 0}, batch)
    again = evaluate(pipe, result, retain=["golf ball"], clip=judge, progress=False, **SETTINGS)
    assert again.metrics == fresh.metrics


def test_erase_then_evaluate_hashes_the_unet_once(monkeypatch, judge):
    """Hashing SD1.5's UNet takes seconds: erase() hashes it once (its trainer's data cache reuses that), evaluate()
    once (its base check and its image cache share it: the UNet may have been edited since erase())."""
    import erase.api
    import erase.data
    import erase.evaluation

    pipe, hashed = tiny_pipeline(), []
    for module in (erase.api, erase.data, erase.evaluation):
        real = module.fingerprint
        monkeypatch.setattr(module, "fingerprint", lambda m, real=real: hashed.append(m) or real(m))
    result = erase.erase(pipe, "church", method="esd", progress=False, steps=1, sample_steps=2)
    evaluate(pipe, result, retain=[], clip=judge, progress=False, **SETTINGS)
    assert [m is pipe.unet for m in hashed].count(True) == 2
    with pytest.raises(erase.EraseError, match="was made from base"):  # another pipeline is still checked
        evaluate(tiny_pipeline(seed=1), result, clip=judge, progress=False, **SETTINGS)
