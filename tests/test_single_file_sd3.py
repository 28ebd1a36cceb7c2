"""SD3 / SD3.5 single files (SAI / ComfyUI layout): read back by diffusers' own from_single_file and by erase's
loader, and the real architectures' key tables, checked on the meta device."""

import json
import shutil

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_sd3_t5_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

import erase
from erase.errors import EraseError
from erase.families.sd3_file import (
    CLIP_G,
    CLIP_L,
    MODEL_PREFIX,
    T5,
    VAE_PREFIX,
    config_for,
    load_single_file,
    save_single_file,
    single_file_state,
    unsupported,
)
from erase_lab.tiny import MODEL_CONFIGS, save_dit_configs, tiny_sd3_file_pipeline

TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3")
TIED = "encoder.embed_tokens.weight"  # T5's input embedding, tied to `shared`: the file holds it once


def written(pipe, folder, **options):
    """The pipeline's single file and a folder of its configs, as from_single_file reads them."""
    save_dit_configs(pipe, folder / "base")
    save_single_file(pipe, folder / "sd3.safetensors", {"method": "none"}, **options)
    return folder / "sd3.safetensors", folder / "base"


def assert_same_weights(expected, loaded, skip=()):
    for name in ("transformer", "vae", *TEXT):
        if getattr(expected, name) is None:
            assert getattr(loaded, name) is None, name
            continue
        a, b = getattr(expected, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(a) == set(b), name
        for key in set(a) - set(skip):
            assert torch.equal(a[key], b[key]), f"{name}.{key}"


def assert_same_images(expected, loaded):
    """Same weights, same images: up to float rounding, as loaded tensors sit differently in memory."""
    def images(pipe):
        return pipe("a church", num_inference_steps=2, height=32, width=32, guidance_scale=2.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    torch.testing.assert_close(images(loaded), images(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize("t5, sd35", [(False, False), (True, True)], ids=["sd3-without-t5", "sd35-with-t5"])
def test_diffusers_reads_the_file_back_to_the_same_weights(tmp_path, t5, sd35):
    pipe = tiny_sd3_file_pipeline(t5=t5, sd35=sd35)
    path, base = written(pipe, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        keys, header = set(f.keys()), f.metadata()
    assert header["method"] == "none"
    assert MODEL_PREFIX + "joint_blocks.1.context_block.adaLN_modulation.1.weight" in keys
    assert (MODEL_PREFIX + "joint_blocks.0.x_block.attn2.qkv.weight" in keys) == sd35
    assert (MODEL_PREFIX + "joint_blocks.0.context_block.attn.ln_q.weight" in keys) == sd35
    assert VAE_PREFIX + "decoder.mid.attn_1.q.weight" in keys
    assert CLIP_L + "text_model.embeddings.position_embedding.weight" in keys
    assert CLIP_G + "text_projection.weight" in keys
    assert (T5 + "encoder.final_layer_norm.weight" in keys) == t5

    transformer = SD3Transformer2DModel.from_single_file(str(path), config=str(base), subfolder="transformer",
                                                         local_files_only=True)
    expected = pipe.transformer.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in transformer.state_dict().items())
    loaded = StableDiffusion3Pipeline.from_single_file(
        str(path), config=str(base), local_files_only=True, tokenizer=erase.clip_tokenizer(),
        tokenizer_2=erase.clip_tokenizer(), **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    assert_same_weights(pipe, loaded, skip=(TIED,))  # diffusers leaves T5's tied embedding unloaded


def test_erase_loads_the_file_to_the_same_pipeline(tmp_path):
    pipe = tiny_sd3_file_pipeline(t5=True, sd35=True)
    loaded = load_single_file(*written(pipe, tmp_path))
    assert_same_weights(pipe, loaded)
    assert loaded.text_encoder_3.encoder.embed_tokens.weight is loaded.text_encoder_3.shared.weight
    assert_same_images(pipe, loaded)


def test_a_file_without_t5_loads_with_t5_absent_from_the_shipped_index(tmp_path):
    """The shipped configs list T5, as the published model does; a file without it loads without it."""
    pipe = tiny_sd3_file_pipeline()
    path, base = written(pipe, tmp_path)
    shutil.copy(MODEL_CONFIGS / "sd3-medium" / "model_index.json", base / "model_index.json")
    loaded = load_single_file(path, base, torch.float32)
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    assert_same_weights(pipe, loaded)
    assert_same_images(pipe, loaded)


def test_a_file_with_t5_needs_a_t5_tokenizer(tmp_path):
    path, base = written(tiny_sd3_file_pipeline(t5=True), tmp_path)
    shutil.rmtree(base / "tokenizer_3")
    with pytest.raises(EraseError, match="needs a T5 tokenizer.*--model-config"):
        load_single_file(path, base)


def test_a_file_without_clip_needs_the_base_model(tmp_path):
    """SAI also released the transformer and VAE alone: their text encoders come from the base model's folder."""
    path, base = written(tiny_sd3_file_pipeline(), tmp_path)
    bare = load_file(str(path))
    save_file({k: v for k, v in bare.items() if not k.startswith((CLIP_L, CLIP_G))}, str(path))
    with pytest.raises(EraseError, match="holds no CLIP-L text encoder.*--model-config"):
        load_single_file(path, base)


def test_half_precision_file(tmp_path):
    pipe = tiny_sd3_file_pipeline()
    path, base = written(pipe, tmp_path, half=True)
    with safe_open(str(path), framework="pt") as f:
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.float16}
    loaded = load_single_file(path, base)
    weight = "transformer_blocks.0.ff.net.0.proj.weight"
    assert torch.equal(loaded.transformer.state_dict()[weight].half(), pipe.transformer.state_dict()[weight].half())


def test_a_transformer_the_layout_cannot_hold_is_refused(tmp_path):
    """Without pos_embed_max_size the position table is not a tensor of the model, and the layout needs it."""
    pipe = tiny_sd3_file_pipeline()
    pipe.transformer = SD3Transformer2DModel(**{**pipe.transformer.config, "pos_embed_max_size": None})
    assert "pos_embed_max_size" in unsupported(pipe)
    with pytest.raises(EraseError, match="use the diffusers folder or the patch"):
        save_single_file(pipe, tmp_path / "sd3.safetensors", {})


def real_pipeline_on_meta(name):
    """The published architecture of `name` (all five models, from the shipped configs) with weights on the meta
    device: nothing real-sized is allocated."""
    folder = MODEL_CONFIGS / name

    def config(component):
        return json.loads((folder / component / "config.json").read_text())

    with init_empty_weights(include_buffers=True):  # the position table too
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel.from_config(config("transformer")),
            vae=AutoencoderKL.from_config(config("vae")), scheduler=None, tokenizer=None, tokenizer_2=None,
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder"))),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2"))),
            text_encoder_3=T5EncoderModel(T5Config(**config("text_encoder_3"))), tokenizer_3=None)


@pytest.mark.parametrize("name, diffusers_type", [("sd3-medium", "sd3"), ("sd35-medium", "sd35_medium"),
                                                  ("sd35-large", "sd35_large")])
def test_real_architectures_map_to_the_layout_and_back(name, diffusers_type):
    """Every tensor of the real model gets an SAI name, and diffusers' own converters take the file's keys back to
    exactly the model's keys and shapes; diffusers and erase both tell which model the file is."""
    pipe = real_pipeline_on_meta(name)
    assert unsupported(pipe) is None
    state = single_file_state(pipe)
    assert infer_diffusers_model_type(state) == diffusers_type
    assert config_for(state) == MODEL_CONFIGS / name
    layers = pipe.transformer.config.num_layers  # every block's FFNs: the image's, and the text's but in the last
    assert sum(k.endswith("x_block.mlp.fc1.weight") for k in state) == layers
    assert sum(k.endswith("context_block.mlp.fc1.weight") for k in state) == layers - 1

    transformer = {k: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    models = {"transformer": convert_sd3_transformer_checkpoint_to_diffusers(transformer),
              "vae": convert_ldm_vae_checkpoint(state, pipe.vae.config),
              "text_encoder": convert_ldm_clip_checkpoint(state, CLIP_L),
              "text_encoder_2": convert_ldm_clip_checkpoint(state, CLIP_G),
              "text_encoder_3": {**convert_sd3_t5_checkpoint_to_diffusers(state), TIED: state[T5 + "shared.weight"]}}
    assert not transformer  # the converter pops what it reads: it read every tensor
    for component, converted in models.items():
        expected = getattr(pipe, component).state_dict()
        assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in expected.items()}, component
    for prefix, component in ((VAE_PREFIX, "vae"), (CLIP_L, "text_encoder"), (CLIP_G, "text_encoder_2"),
                              (T5, "text_encoder_3")):
        tied = component == "text_encoder_3"
        assert sum(k.startswith(prefix) for k in state) == len(models[component]) - tied, component


def test_config_for_needs_an_sd3_transformer():
    assert config_for(["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"]) is None
