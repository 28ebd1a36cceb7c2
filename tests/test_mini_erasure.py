"""Erasure measured on the miniature world: what the evaluator must see when a method really erases a concept.

The world's Imagenette objects are taught through a few feed-forward neurons each (erase_lab/train_mini.py), as
published analyses find such concepts in Stable Diffusion: FIA, the training-free flagship, must find and remove
them with the mini model's object preset (configs/fia-object-mini.yaml), and leave the other objects as they were.

The object is the parachute: FIA's mask holds its neurons whole, and once they are gone the judge no longer sees a
parachute. The church is not the test's object although FIA's mask holds 95% of its neurons' weight: with its
neurons zeroed the base model still paints the church's colours from its name (the text encoder knows them) and the
mini judge reads those blobs as "church" (BENCHMARKS.md, "Miniature world: erasure gates").
"""

import erase


def test_fia_erases_a_taught_object_and_keeps_the_others(mini):
    result = erase.erase(mini, "parachute", config="fia-object-mini", progress=False)
    report = erase.evaluate(mini, result, retain=["golf ball", "church", "chain saw", "cat", "car"], progress=False,
                            prompts_per_concept=4, seeds=[0, 1])  # the mini guidance
    parachute = report.metrics["forget"]["parachute"]
    assert parachute["original"] >= 0.75, parachute
    assert parachute["erased"] <= 0.25, parachute
    kept = [v["erased"] / v["original"] for v in report.metrics["retain"].values() if v["original"] > 0]
    assert sum(kept) / len(kept) >= 0.8, report.metrics["retain"]
    assert report.metrics["fidelity"]["paired_similarity_neutral"] >= 0.85
