"""A diffusion transformer's edit as a LoRA in diffusers' (PEFT) names: diffusers' FluxPipeline.load_lora_weights reads
it back to the edited weights, and every key is one ComfyUI maps onto its Flux layout."""

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from erase.edits import MaskEdit
from erase.lora import save_lora, to_lora
from erase_lab.tiny import tiny_flux_pipeline

# ComfyUI reads a Flux LoRA key `transformer.X` (comfy/lora.py, model_lora_keys_unet) when X.weight is a diffusers
# name comfy/utils.py flux_to_diffusers maps onto its BFL layout (q, k, v and proj_mlp as row slices of the fused
# qkv and linear1), i.e. one of these Linear weights:
COMFY_FLUX = re.compile(
    r"transformer_blocks\.\d+\.(?:attn\.(?:to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|norm1(?:_context)?\.linear"
    r"|ff(?:_context)?\.net\.(?:0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(?:attn\.to_[qkv]|proj_mlp|proj_out|norm\.linear)"
    r"|x_embedder|context_embedder|proj_out|norm_out\.linear|time_text_embed\.(?:timestep|text|guidance)_embedder"
    r"\.linear_[12]")


def dense_edit(transformer) -> MaskEdit:
    """Every tensor moved by seeded noise: Linear weights (a double block's to_q, a single block's proj_out, the
    top-level proj_out that shares its name's tail, ...), biases and the RMS norms' weights."""
    generator = torch.Generator().manual_seed(5)
    old = {name: p.detach().clone() for name, p in transformer.named_parameters()}
    return MaskEdit.from_weights({n: p + 0.01 * torch.randn(p.shape, generator=generator) for n, p in old.items()}, old)


@pytest.fixture(scope="module")
def flux_edit():
    transformer = tiny_flux_pipeline().transformer
    return transformer, dense_edit(transformer)


def test_full_rank_lora_of_a_flux_edit_loads_into_diffusers_as_the_edited_weights(flux_edit, tmp_path):
    transformer, edit = flux_edit
    lora = to_lora(transformer, edit, "full")
    save_lora(tmp_path / "lora.safetensors", lora, {"method": "esd"})
    pipe = tiny_flux_pipeline()  # the same seeded weights: the original model
    original = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = dict(pipe.transformer.named_parameters())
    linears = {f"{name}.weight" for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(lora.modules) == linears
    assert {"single_transformer_blocks.0.proj_out.weight", "transformer_blocks.0.attn.to_q.weight"} <= linears
    with edit.applied_to(transformer):
        for name, edited in transformer.named_parameters():
            if name in linears:
                assert torch.allclose(fused[name], edited, atol=1e-6), name
            else:  # biases and norm weights are no LoRA factors: the loaded model keeps the original's
                assert torch.equal(fused[name], original[name]), name
    assert lora.record["dropped_by_rank"] < 1e-5 and lora.record["dropped_not_lora"] > 0


def test_every_key_is_one_comfyui_maps_with_no_alpha_and_no_kohya_header(flux_edit, tmp_path):
    """No alpha: scale 1 in ComfyUI (and diffusers' PEFT config takes alpha = rank)."""
    transformer, edit = flux_edit
    save_lora(tmp_path / "lora.safetensors", to_lora(transformer, edit, 2), {"method": "esd"})
    tensors, weights = load_file(str(tmp_path / "lora.safetensors")), transformer.state_dict()
    with safe_open(str(tmp_path / "lora.safetensors"), framework="pt") as f:
        assert f.metadata() == {"method": "esd"}
    modules = {key.rsplit(".", 2)[0] for key in tensors}
    assert set(tensors) == {f"{module}.lora_{side}.weight" for module in modules for side in "AB"}
    for module in modules:
        name = module.removeprefix("transformer.")
        assert module.startswith("transformer.") and COMFY_FLUX.fullmatch(name), module
        down, up = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        assert down.shape[0] == up.shape[1] == 2 and (up @ down).shape == weights[f"{name}.weight"].shape, module
