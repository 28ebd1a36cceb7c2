"""Concept inversion: a new word learnt on the erased model, on tiny SD and SDXL pipelines with a tiny judge (what
is learnt, what is left as it was, refusals), and on the miniature world what a user checks: a word learnt on a weak
erasure brings the concept back more often than the erased model draws it from its name."""

import pytest
import torch

import erase
from erase.attacks.prompt import text_encoders
from erase_lab.tiny import tiny_flux_pipeline, tiny_sdxl_pipeline

TINY = {"prompts_per_concept": 2, "seeds": [0, 1], "sample_steps": 2, "steps": 3, "batch_size": 2}


def test_inversion_learns_one_new_word_per_concept_and_leaves_the_model_as_it_was(run, judge):
    pipe, result, _ = run
    unet = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    table = pipe.text_encoder.get_input_embeddings().weight.clone()
    report = erase.attack(pipe, result, kind="inversion", clip=judge, progress=False, **TINY)
    records = report.records
    word = records[0]["words"]
    assert {r["words"] for r in records} == {word} and len(records) == 4
    assert all(r["attacked_prompt"] == r["prompt"].replace("church", word) for r in records)
    assert all(word not in r["prompt"].split() for r in records)
    assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1
    assert report.settings["kind"] == "inversion" and report.settings["steps"] == 3
    # The denoiser and the text encoder are restored; no gradient was left on the model.
    assert all(torch.equal(p, unet[n]) for n, p in pipe.unet.named_parameters())
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)
    assert all(p.grad is None for p in [*pipe.unet.parameters(), *pipe.text_encoder.parameters()])
    again = erase.attack(pipe, result, kind="inversion", clip=judge, progress=False, **TINY)
    assert [r["attacked_prompt"] for r in again.records] == [r["attacked_prompt"] for r in records]
    assert [r["loss"] for r in again.records] == [r["loss"] for r in records]


def test_the_learnt_embedding_moves_and_conditions_the_attacked_images(run):
    from erase.attacks.inversion import InversionAttackConfig, run as invert
    from erase.attacks.core import Target
    from erase.models import image_side

    pipe, result, _ = run
    side = image_side(pipe, None)
    latents = torch.randn(2, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    targets = [Target("church", f"a photo of a church, view {i}", i, latents[i], text="church") for i in range(2)]
    config = InversionAttackConfig(steps=4, batch_size=2, lr=0.1)
    found, learnt = invert(pipe, result.edit, targets, config, progress=False)
    (token, vectors), = learnt.vectors.items()
    start = pipe.tokenizer("thing", add_special_tokens=False).input_ids[0]
    encoder = pipe.text_encoder
    assert not torch.allclose(vectors[0], encoder.get_input_embeddings().weight[start].float())
    ids = pipe.tokenizer([found[0]["prompt"]], return_tensors="pt").input_ids
    plain = encoder(ids)[0]
    with learnt.applied_to(pipe.unet):
        assert not torch.equal(encoder(ids)[0], plain)  # the word reads as its learnt embedding
    assert torch.equal(encoder(ids)[0], plain)


def test_inversion_runs_on_sdxl_with_one_embedding_per_text_encoder(judge):
    sdxl = tiny_sdxl_pipeline()
    result = erase.erase(sdxl, "church", progress=False, prompts_per_concept=2, saliency_steps=2)
    report = erase.attack(sdxl, result, kind="inversion", clip=judge, progress=False, **{**TINY, "seeds": [0]})
    assert report.metrics["concepts"]["church"]["prompts"] == 2 and len(text_encoders(sdxl)) == 2


def test_refusals_before_any_work(run, judge):
    pipe, result, _ = run
    with pytest.raises(erase.EraseError, match="init='stained glass' is not one token"):
        erase.attack(pipe, result, kind="inversion", clip=judge, progress=False, init="stained glass")
    with pytest.raises(erase.EraseError, match="lr=0 is out of range"):
        erase.attack(pipe, result, kind="inversion", clip=judge, progress=False, lr=0)
    flux = tiny_flux_pipeline()
    erased = erase.erase(flux, "church", progress=False, prompts_per_concept=2, saliency_steps=2)
    with pytest.raises(erase.EraseError, match="the inversion attack works on CLIP tokens .* T5EncoderModel"):
        erase.attack(flux, erased, kind="inversion", clip=judge, progress=False, **TINY)


def test_a_word_learnt_on_a_weak_erasure_brings_the_concept_back(mini):
    weak = erase.erase(mini, "tench", r2=0.002, progress=False)
    report = erase.attack(mini, weak, kind="inversion", progress=False, prompts_per_concept=2, seeds=[0, 1],
                          steps=60, lr=0.02)
    tench = report.metrics["concepts"]["tench"]
    assert tench["original"] >= 0.5, tench
    assert tench["attacked_only"] > tench["anchor"], tench
