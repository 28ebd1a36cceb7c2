"""Erasure measured on the miniature world: what the evaluator must see when a method really erases a shape.

The training-free methods do not erase on this model (scripts/mini_erasure_gate.py, BENCHMARKS.md); SalUn and
the dynamic-mask method do, with the presets tuned for the mini world.
"""

import pytest

import erase
from erase.mini import world


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    import os

    os.environ["ERASE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return erase.load_pipeline("mini")


@pytest.mark.parametrize("method", ["salun", "dynamic"])
def test_erasing_a_shape_lowers_its_accuracy_and_keeps_the_others(mini, method):
    result = erase.erase(mini, "circle", method=method, config=f"{method}-mini", progress=False)
    report = erase.evaluate(mini, result, retain=[s for s in world.SHAPES if s != "circle"], progress=False,
                            prompts_per_concept=6, seeds=[0], guidance_scale=4.0)
    circle = report.metrics["forget"]["circle"]
    assert circle["original"] >= 0.8
    assert circle["erased"] <= circle["original"] - 0.5, circle
    kept = [v["erased"] / v["original"] for v in report.metrics["retain"].values() if v["original"] > 0]
    assert sum(kept) / len(kept) >= 0.7, report.metrics["retain"]
    assert report.metrics["summary"]["overall"] > 0.6
