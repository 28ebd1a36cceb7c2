"""The evaluator's mechanics on a tiny pipeline with a tiny (untrained) open_clip judge: pairing, determinism,
files, grids and refusals. Whether it measures forgetting is tested on the miniature world."""

import importlib.util
import json

import numpy as np
import open_clip
import pytest
import torch

import erase
from erase.evaluation import Judge, evaluate
from erase.evaluation.report import CELL, LABEL_WIDTH
from tiny import tiny_pipeline

SETTINGS = {"prompts_per_concept": 2, "steps": 2, "seeds": [0, 1]}


@pytest.fixture(scope="module")
def judge():
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                     "head_width": 16},
                           text_cfg={"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1})
    preprocess = open_clip.image_transform(32, is_train=False)
    return Judge(model, preprocess, open_clip.tokenizer.SimpleTokenizer(), name="tiny-random", pretrained=None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pipe = tiny_pipeline()
    result = erase.erase(pipe, "church", progress=False, prompts_per_concept=2, saliency_steps=2)
    return pipe, result, result.save(tmp_path_factory.mktemp("runs") / "church")


def test_report_files_and_grid(run, judge, tmp_path):
    pipe, result, _ = run
    report = evaluate(pipe, result, retain=["golf ball"], clip=judge, progress=False, **SETTINGS)
    summary = report.metrics["summary"]
    assert 0 <= summary["forgetting_accuracy"] <= 1 and 0 <= summary["retain_accuracy"] <= 1
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
    if importlib.util.find_spec("nudenet") is None:  # the `nudity` extra is not part of the test install
        with pytest.raises(erase.EraseError, match="NudeNet is not installed"):
            evaluate(pipe, result, clip=judge, progress=False, nudity=True, **SETTINGS)
