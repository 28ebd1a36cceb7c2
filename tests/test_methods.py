"""FIA and ConceptPrune end to end on tiny pipelines: what the edit does to the weights, and determinism."""

import pytest
import torch

import erase
from erase.capture import CaptureSettings, ColumnStats
from erase.saliency import fia_concept_mask

FAST = {"prompts_per_concept": 4, "saliency_steps": 3, "fill": "zeros"}  # pruning as published (noise: test_revival)


@pytest.fixture(scope="module")
def result():
    from erase_lab.tiny import tiny_pipeline

    return erase.erase(tiny_pipeline(), "van gogh,church", progress=False, **FAST)


def test_masked_entries_are_zero_and_nothing_else_changes(result):
    unet = result.pipe.unet
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    assert sum(int(m.sum()) for m in result.edit.masks.values()) > 0
    with result.applied():
        for name, param in unet.named_parameters():
            mask = result.edit.masks.get(name)
            if mask is None:
                assert torch.equal(param, before[name]), name
            else:
                assert torch.all(param[mask] == 0), name
                assert torch.equal(param[~mask], before[name][~mask]), name
    for name, param in unet.named_parameters():  # restore is bit-exact
        assert torch.equal(param, before[name]), name


def test_only_target_weights_are_masked(result):
    assert result.edit.masks and all(name.endswith("ff.net.2.weight") for name in result.edit.masks)


def test_same_seed_same_mask_and_other_seed_differs(result):
    again = erase.erase(result.pipe, "van gogh,church", progress=False, **FAST)
    assert all(torch.equal(again.edit.masks[n], m) for n, m in result.edit.masks.items())
    other = erase.erase(result.pipe, "van gogh,church", progress=False, seed=7, **FAST)
    assert any(not torch.equal(other.edit.masks[n], m) for n, m in result.edit.masks.items())


def test_record_says_what_was_done(result):
    record = result.record
    assert record["method"] == "fia" and record["seed"] == 1244
    assert [c["name"] for c in record["concepts"]] == ["van gogh", "church"]
    assert [c["kind"] for c in record["concepts"]] == ["style", "object"]
    assert record["prompts"]["van gogh"][0] == ["a cat in the style of van gogh", "a cat"]
    assert len(record["timesteps"]) == 3 and record["fusion"]["tau"] == 2
    assert record["totals"]["edited"] == sum(int(m.sum()) for m in result.edit.masks.values())


def test_single_concept_prunes_its_mask(pipe):
    result = erase.erase(pipe, ["nudity"], progress=False, **FAST)
    pruned = result.record["totals"]["edited"]
    assert pruned > 0 and pruned == sum(result.record["concept_masks"]["nudity"].values())


def test_per_concept_override_widens_that_mask(pipe):
    narrow = erase.erase(pipe, ["church"], progress=False, r2=0.01, **FAST)
    wide = erase.erase(pipe, ["church"], progress=False, r2=0.01, overrides={"church": {"r2": 0.05}}, **FAST)
    assert wide.record["totals"]["edited"] > narrow.record["totals"]["edited"]


def test_sd2_shaped_pipeline(pipe_sd2):
    result = erase.erase(pipe_sd2, "claude monet", progress=False, **FAST)
    assert result.record["totals"]["edited"] > 0


def test_faithful_cosine_and_conceptprune_run_through_the_same_capture(pipe):
    cosine = erase.erase(pipe, "church", progress=False, faithful_cosine=True, **FAST)
    pruned = erase.erase(pipe, "church", method="conceptprune", progress=False, **FAST)
    for result in (cosine, pruned):
        assert result.record["totals"]["edited"] > 0
        assert set(result.edit.masks) == set(cosine.edit.masks)


def stats_of(columns: list[list[float]]) -> ColumnStats:
    """ColumnStats over prompts with one captured step; columns[p] is prompt p's column vector."""
    stats = ColumnStats()
    stats.add("layer", 0, 1, torch.tensor(columns, dtype=torch.float32))
    stats.count = len(columns)
    return stats


def test_fia_mask_is_row_topk_and_layer_topk_of_sensitivity():
    layer = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 3.0, 1.0, 1.0], [3.0, 1.0, 1.0, 2.0]]))
    base = stats_of([[1, 1, 1, 1], [1, 1, 1, 1]])
    concept = stats_of([[1, 2, 1, 3], [1, 2, 1, 3]])  # margin c = [0, 1, 0, 2]
    # S = |W|·c = [[0, 3, 0, 2], [0, 1, 0, 4]]; r1 = 0.25 → τ = 3, only (1, 3) exceeds it;
    # A = ½ S/4 + ½ 1[S > τ] = [[0, .375, 0, .25], [0, .125, 0, 1]].
    mask = fia_concept_mask({"layer": layer}, concept, base, r1=0.25, r2=0.25)["layer"]
    assert mask.tolist() == [[False, True, False, False], [False, False, False, True]]
    # r2 = 0.125: still one entry per row, but only one in the whole layer — the intersection keeps (1, 3).
    mask = fia_concept_mask({"layer": layer}, concept, base, r1=0.25, r2=0.125)["layer"]
    assert mask.tolist() == [[False, False, False, False], [False, False, False, True]]


def test_no_margin_means_empty_mask():
    layer = torch.nn.Linear(3, 2)
    same = stats_of([[1, 2, 3], [1, 2, 3]])
    assert not fia_concept_mask({"layer": layer}, same, same, r1=0.5, r2=0.5)["layer"].any()


def test_capture_settings_are_validated():
    with pytest.raises(erase.EraseError, match="saliency_steps"):
        CaptureSettings(steps=5, saliency_steps=6).validate()


def test_settings_merge_into_a_preset_without_dropping_its_overrides():
    from erase.api import resolve_config

    config = resolve_config("fia", "fia-style", r2=0.05, overrides={"church": {"r2": 0.04}})
    assert config.r2 == 0.05 and config.alpha == 0.8
    assert config.overrides == {"van gogh": {"r2": 0.03}, "church": {"r2": 0.04}}
    with pytest.raises(erase.EraseError, match="preset for method 'fia'"):
        resolve_config("uce", "fia-style")


def test_fia_across_two_processes_gives_the_one_process_masks(tmp_path):
    """Each process captures a share of the concepts; the votes summed across them fuse to one process's masks."""
    import json

    from ddp_worker import MASKING_CONCEPTS, MASKING_QUICK, launch_two

    launch_two("fia", tmp_path)
    alone = erase.erase(erase.load_pipeline("mini"), MASKING_CONCEPTS, progress=False, **MASKING_QUICK)
    for rank in (0, 1):
        masks = torch.load(tmp_path / f"masks{rank}.pt", weights_only=True)
        assert masks.keys() == alone.edit.masks.keys() and any(m.any() for m in masks.values())
        assert all(torch.equal(masks[n], alone.edit.masks[n]) for n in masks)
        record = json.loads((tmp_path / f"record{rank}.json").read_text())
        assert record["processes"] == 2 and record["fusion"]["concepts"] == len(MASKING_CONCEPTS)
        assert list(record["concept_masks"]) == MASKING_CONCEPTS
        assert record["concept_masks"] == alone.record["concept_masks"]
