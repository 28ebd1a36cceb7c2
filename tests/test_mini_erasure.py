"""Erasure measured on the miniature world: what the evaluator must see when a method really erases a concept.

The world's Imagenette objects are taught through a few feed-forward neurons each (scripts/train_mini.py), as
published analyses find such concepts in Stable Diffusion: FIA, the training-free flagship, must find and remove
them with the shipped preset, and leave the other objects as they were. The shipped model does not meet this yet
(issue 14, BENCHMARKS.md): strict xfail, so the day it passes the suite says so.
"""

import pytest

import erase


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    import os

    os.environ["ERASE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return erase.load_pipeline("mini")


@pytest.mark.xfail(strict=True, reason="issue 14: the taught neurons fire ~20x below their layer's mean and FIA's "
                   "mask selects none of them; church 0.75 -> 0.50")
def test_fia_erases_a_taught_object_and_keeps_the_others(mini):
    result = erase.erase(mini, "church", config="fia-object", progress=False)
    report = erase.evaluate(mini, result, retain=["golf ball", "parachute", "chain saw", "cat", "car"], progress=False,
                            prompts_per_concept=4, seeds=[0], guidance_scale=4.0)
    church = report.metrics["forget"]["church"]
    assert church["original"] >= 0.75, church
    assert church["erased"] <= 0.25, church
    kept = [v["erased"] / v["original"] for v in report.metrics["retain"].values() if v["original"] > 0]
    assert sum(kept) / len(kept) >= 0.8, report.metrics["retain"]
    assert report.metrics["fidelity"]["paired_similarity_neutral"] >= 0.85
