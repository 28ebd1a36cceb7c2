"""UCE: the closed-form edit maps a concept's embedding to its anchor's output and keeps preserved ones."""

import json

import pytest
import torch

import erase
from erase.families import find_target_layers
from erase.methods.uce import last_token_embeddings


@pytest.fixture(scope="module")
def uce(tmp_path_factory):
    from erase_lab.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    result = erase.erase(pipe, "van gogh", method="uce", progress=False, lam=0.1, preserve=["claude monet"])
    return pipe, result, result.save(tmp_path_factory.mktemp("uce") / "run")


def test_concept_now_reads_as_its_anchor_and_preserved_texts_do_not_move(uce):
    pipe, result, _ = uce
    concept, anchor, kept = last_token_embeddings(pipe, ["van gogh", "a painting", "claude monet"])
    layers = find_target_layers(pipe.unet, "*attn2.to_[kv]")
    old = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    with result.applied():
        for name, layer in layers.items():
            new = layer.weight.detach()
            target = old[name] @ anchor
            assert (new @ concept - target).norm() < 0.25 * (old[name] @ concept - target).norm(), name
            assert (new @ kept - old[name] @ kept).norm() < 0.25 * (old[name] @ kept).norm(), name


def test_only_cross_attention_keys_and_values_change(uce):
    pipe, result, _ = uce
    assert result.edit.masks and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in result.edit.masks)
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    with result.applied():
        for name, param in pipe.unet.named_parameters():
            if name not in result.edit.masks:
                assert torch.equal(param, before[name]), name
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())


def test_patch_with_values_reproduces_the_edit(uce):
    from diffusers import UNet2DConditionModel

    from erase_lab.tiny import tiny_pipeline

    _, _, out = uce
    base = tiny_pipeline()
    erase.apply_patch(base, out / "patch.safetensors")
    exported = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert all(torch.equal(t, exported[n]) for n, t in base.unet.state_dict().items())
    record = json.loads((out / "erase.json").read_text())
    assert record["method"] == "uce" and record["config"]["lam"] == 0.1 and record["guides"] == {"van gogh": "a painting"}


def test_lam_must_be_positive(pipe):
    with pytest.raises(erase.EraseError, match="lam=0"):
        erase.erase(pipe, "van gogh", method="uce", progress=False, lam=0)
