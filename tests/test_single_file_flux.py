"""Flux.1 single files: the transformer in Black Forest Labs' layout (what ComfyUI's "Load Diffusion Model" and Forge
read), read back by diffusers' own from_single_file to the same weights; the shipped dev and schnell configs; the
real architectures' layout on the meta device."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import erase
from erase.families.flux_file import (
    COMFY_PREFIX,
    DEV,
    SCHNELL,
    bfl_layout,
    config_for,
    load_transformer,
    save_single_file,
    transformer_state,
    unsupported,
)
from erase_lab.tiny import (
    flux_at_reader_width,
    real_flux_on_meta,
    tiny_chroma_pipeline,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_file_reads_back_through_diffusers_to_the_same_weights(guidance, tmp_path):
    """diffusers' reader splits linear1 at Flux.1's width whatever the config says: the transformer has that width."""
    pipe = tiny_flux_pipeline(guidance=guidance)
    pipe.transformer = flux_at_reader_width(guidance)
    pipe.transformer.save_config(tmp_path / "base" / "transformer")
    path = tmp_path / "flux.safetensors"
    save_single_file(pipe, path, {"method": "uce", "concepts": ["van gogh"]})
    with safe_open(str(path), framework="pt") as f:
        keys, header = set(f.keys()), f.metadata()
    assert keys == set(bfl_layout(pipe.transformer.config)) and ("guidance_in.in_layer.weight" in keys) is guidance
    assert json.loads(header["concepts"]) == ["van gogh"] and header["method"] == "uce"
    assert config_for(keys) == (DEV if guidance else SCHNELL)
    original = pipe.transformer.state_dict()
    back = load_transformer(path, tmp_path / "base", torch.float16).state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[name], tensor) for name, tensor in original.items())
    with pytest.raises(erase.EraseError, match="does not fit the flux-.* architecture .the file lacks double_blocks.1."):
        load_transformer(path, DEV if guidance else SCHNELL)  # Flux.1 has 19 double blocks


def test_half_file_holds_every_tensor_once(tmp_path):
    pipe = SimpleNamespace(transformer=flux_at_reader_width(guidance=False).to(torch.bfloat16))
    save_single_file(pipe, tmp_path / "flux.safetensors", {}, half=True)
    written, state = load_file(str(tmp_path / "flux.safetensors")), transformer_state(pipe.transformer)
    assert written.keys() == state.keys()
    assert all(written[k].dtype == torch.float16 and torch.equal(written[k], state[k].half()) for k in state)
    assert sum(t.numel() for t in written.values()) == sum(p.numel() for p in pipe.transformer.parameters())


@pytest.mark.parametrize("name, config_dir, guidance", [("flux-dev", DEV, True), ("flux-schnell", SCHNELL, False)])
def test_real_architecture_layout_is_what_diffusers_converts_back(name, config_dir, guidance):
    """Flux.1's 12B transformer on the meta device: diffusers' converter takes our layout back to exactly its keys and
    shapes, and the shapes ComfyUI detects the model by are Flux.1's."""
    transformer = real_flux_on_meta(name)
    assert transformer.config.guidance_embeds is guidance
    state = transformer_state(transformer)
    assert config_for(state) == config_dir and config_for(COMFY_PREFIX + key for key in state) == config_dir
    expected = transformer.state_dict()
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    assert back.keys() == expected.keys()
    assert all(back[key].shape == tensor.shape for key, tensor in expected.items())
    assert len({key.split(".")[1] for key in state if key.startswith("double_blocks.")}) == 19
    assert len({key.split(".")[1] for key in state if key.startswith("single_blocks.")}) == 38
    assert state["img_in.weight"].shape == (3072, 64) and state["txt_in.weight"].shape == (3072, 4096)
    assert state["vector_in.in_layer.weight"].shape == (3072, 768)
    assert state["single_blocks.0.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 3072)


@pytest.mark.parametrize("name, other, why", [("flux-dev", SCHNELL, "the architecture has no guidance_in.in_layer"),
                                              ("flux-schnell", DEV, "the file lacks guidance_in.in_layer")])
def test_dev_and_schnell_files_are_not_read_with_each_others_config(name, other, why, tmp_path):
    """The names are checked before any weight is read (diffusers would drop dev's guidance embedding unread): a file
    of the real tensor names, each tensor a placeholder."""
    save_file({key: torch.zeros(1) for key in transformer_state(real_flux_on_meta(name))}, tmp_path / "flux.safetensors")
    with pytest.raises(erase.EraseError, match=f"does not fit the {other.name} architecture .{why}"):
        load_transformer(tmp_path / "flux.safetensors", other)


def test_config_for_tells_flux1_from_other_files():
    assert config_for(["model.diffusion_model.input_blocks.0.0.weight"]) is None  # Stable Diffusion
    chroma = ["double_blocks.0.img_attn.norm.key_norm.scale", "distilled_guidance_layer.in_proj.weight"]
    assert config_for(chroma) is None  # Chroma and Flux.2 have no vector_in


def test_only_flux1_transformers_have_the_bfl_layout(tmp_path):
    assert unsupported(SimpleNamespace(transformer=real_flux_on_meta("flux-dev"))) is None
    for make in (tiny_chroma_pipeline, tiny_sd3_pipeline):
        reason = unsupported(make())
        assert "FluxTransformer2DModel" in reason and "transformer/ folder" in reason
    with pytest.raises(erase.EraseError, match="holds a FluxTransformer2DModel, not ChromaTransformer2DModel"):
        save_single_file(tiny_chroma_pipeline(), tmp_path / "chroma.safetensors", {})
    assert not (tmp_path / "chroma.safetensors").exists()


def test_a_transformer_narrower_than_flux1_is_refused_in_one_line(tmp_path):
    """diffusers' converter splits linear1 at Flux.1's width: erase writes no file of another width, and one written
    elsewhere does not load, even with its own config."""
    pipe = tiny_flux_pipeline()
    pipe.transformer.save_config(tmp_path / "base" / "transformer")
    with pytest.raises(erase.EraseError, match="only at Flux.1's width"):
        save_single_file(pipe, tmp_path / "tiny.safetensors", {})
    save_file({k: v.contiguous() for k, v in transformer_state(pipe.transformer).items()}, str(tmp_path / "tiny.safetensors"))
    with pytest.raises(erase.EraseError, match="tiny.safetensors could not be loaded as a Flux.1 transformer") as error:
        load_transformer(tmp_path / "tiny.safetensors", tmp_path / "base")
    assert "--model-config" in str(error.value) and "\n" not in str(error.value)
