"""Single-file checkpoints (original SD layout) read back by diffusers' from_single_file, and `apply`."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

import erase
from erase.cli import main
from erase.single_file import save_single_file
from erase_lab.tiny import MODEL_CONFIGS, save_configs, tiny_pipeline, tiny_sdxl_pipeline

FAST = {"prompts_per_concept": 2, "saliency_steps": 2}


def load_single_file(path, config_dir):
    return StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                    tokenizer=erase.clip_tokenizer())


def assert_same_weights(expected, loaded, more=()):
    for name in ("unet", "vae", "text_encoder", *more):
        a, b = getattr(expected, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(a) == set(b), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"


@pytest.fixture(scope="module")
def erased_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    pipe = tiny_pipeline()
    pipe.save_pretrained(root / "base")
    result = erase.erase(pipe, "church", progress=False, **FAST)
    return pipe, result, result.save(root / "church"), root


def test_single_file_round_trip_gives_the_erased_weights(erased_run):
    pipe, result, out, root = erased_run
    loaded = load_single_file(out / "church.safetensors", root / "base")
    with result.applied():
        assert_same_weights(pipe, loaded)
    with safe_open(str(out / "church.safetensors"), framework="pt") as f:
        header = f.metadata()
        assert any(k.startswith("model.diffusion_model.input_blocks.") for k in f.keys())
        assert any(k.startswith("first_stage_model.encoder.down.") for k in f.keys())
    assert json.loads(header["concepts"])[0]["name"] == "church" and header["method"] == "fia"
    assert header["base_fingerprint"] == result.record["base_fingerprint"]


def test_half_precision_single_file(erased_run, tmp_path):
    pipe, _, _, root = erased_run
    save_single_file(pipe, tmp_path / "half.safetensors", {"method": "none"}, half=True)
    with safe_open(str(tmp_path / "half.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    loaded = load_single_file(tmp_path / "half.safetensors", root / "base")
    weight = "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"
    assert torch.equal(loaded.unet.state_dict()[weight].half(), pipe.unet.state_dict()[weight].half())


def test_sd15_architecture_round_trip(tmp_path):
    """The real SD1.5 UNet (random weights) with a small VAE and a 768-wide one-layer text encoder."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((MODEL_CONFIGS / "sd15" / "unet" / "config.json").read_text()))
    small = tiny_pipeline()
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=64, num_attention_heads=12,
                                                num_hidden_layers=1, vocab_size=49408, bos_token_id=49406,
                                                eos_token_id=49407, pad_token_id=49407))
    pipe = StableDiffusionPipeline(**{**small.components, "unet": unet, "text_encoder": text_encoder})
    save_configs(pipe, tmp_path / "base")
    save_single_file(pipe, tmp_path / "sd15.safetensors", {"method": "none"})
    assert_same_weights(pipe, load_single_file(tmp_path / "sd15.safetensors", tmp_path / "base"))


SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
            "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")


def write_layout(source, path, text_model: bool, released: bool) -> None:
    """`source` (erase's layout) rewritten as other tools write SD1.x: the text encoder without `text_model.` (diffusers'
    converter under transformers 5), and the EMA copy, position ids and DDPM schedule of released checkpoints."""
    state = load_file(str(source))
    text = "cond_stage_model.transformer."
    if not text_model:  # SD1.x's, or SDXL's first encoder's
        state = {k.replace("transformer.text_model.", "transformer.", 1): v for k, v in state.items()}
    if released:
        state.update({f"model_ema.{k[len('model.'):].replace('.', '')}": v + 1  # EMA weights that must not be loaded
                      for k, v in state.items() if k.startswith("model.diffusion_model.")})
        state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)})
        state.update({name: torch.rand(1000, dtype=torch.float64) for name in SCHEDULE})
        state[text + ("text_model." if text_model else "") + "embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, str(path))


def fingerprints(pipe) -> dict:
    return {name: erase.fingerprint(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder")}


@pytest.mark.parametrize("text_model", [True, False], ids=["text_model", "flat-text"])
@pytest.mark.parametrize("released", [False, True], ids=["bare", "ema-schedule"])
def test_every_sd1_layout_loads_to_the_folder_fingerprint(erased_run, tmp_path, text_model, released):
    pipe, _, _, root = erased_run
    save_single_file(pipe, tmp_path / "ours.safetensors", {"method": "none"})
    write_layout(tmp_path / "ours.safetensors", tmp_path / "model.safetensors", text_model, released)
    loaded = erase.load_pipeline(tmp_path / "model.safetensors", config=root / "base")
    assert fingerprints(loaded) == fingerprints(erase.load_pipeline(root / "base"))


def test_a_flat_text_layout_is_recognised_as_sd15_without_a_model_config(erased_run, tmp_path):
    """Recognised (the shipped SD1.5 config is tried), so the error names --model-config, not an unknown file."""
    save_single_file(erased_run[0], tmp_path / "ours.safetensors", {"method": "none"})
    write_layout(tmp_path / "ours.safetensors", tmp_path / "model.safetensors", text_model=False, released=False)
    with pytest.raises(erase.EraseError, match="could not be loaded as a Stable Diffusion checkpoint .*--model-config"):
        erase.load_pipeline(tmp_path / "model.safetensors")


def test_a_run_on_a_single_file_records_its_path_and_sha256(erased_run, tmp_path, capsys):
    pipe, _, _, root = erased_run
    save_single_file(pipe, tmp_path / "ours.safetensors", {"method": "none"})
    model = tmp_path / "model.safetensors"
    write_layout(tmp_path / "ours.safetensors", model, text_model=False, released=True)
    assert main(["--concepts", "church", "--model", str(model), "--model-config", str(root / "base"), "--out",
                 str(tmp_path / "out"), "--quiet", *(f"--set={k}={v}" for k, v in FAST.items())]) == 0
    record = json.loads((tmp_path / "out" / "erase.json").read_text())
    assert record["model"]["source"] == str(model)
    assert record["model"]["sha256"] == "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
    assert record["base_fingerprint"] == erase.fingerprint(erase.load_pipeline(root / "base").unet)


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_sd2_and_sdxl_single_files_load_back_identically(kind, tmp_path):
    """SD2.x: OpenCLIP under cond_stage_model.model; SDXL: CLIP-L and OpenCLIP with text_projection, label_emb."""
    pipe = tiny_pipeline(sd2=True) if kind == "sd2" else tiny_sdxl_pipeline(width_2=48)
    save_configs(pipe, tmp_path / "base")
    save_single_file(pipe, tmp_path / "model.safetensors", {"method": "none"})
    cls, extra = (StableDiffusionPipeline, {}) if kind == "sd2" else (StableDiffusionXLPipeline,
                                                                      {"tokenizer_2": erase.clip_tokenizer()})
    loaded = cls.from_single_file(str(tmp_path / "model.safetensors"), config=str(tmp_path / "base"),
                                  local_files_only=True, tokenizer=erase.clip_tokenizer(), **extra)
    assert_same_weights(pipe, loaded, ("text_encoder_2",) if kind == "sdxl" else ())
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    text = "cond_stage_model.model." if kind == "sd2" else "conditioner.embedders.1.model."
    assert f"{text}transformer.resblocks.1.attn.in_proj_weight" in keys and f"{text}positional_embedding" in keys
    assert kind == "sd2" or {"conditioner.embedders.1.model.text_projection",
                             "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                             "model.diffusion_model.label_emb.0.2.weight"} <= keys
    model = tmp_path / "model.safetensors"
    if kind == "sdxl":  # and with CLIP-L written without text_model., as diffusers' converter does
        write_layout(model, tmp_path / "flat.safetensors", text_model=False, released=False)
        model = tmp_path / "flat.safetensors"
    through_erase = erase.load_pipeline(model, config=tmp_path / "base")  # what --model FILE does
    assert_same_weights(pipe, through_erase, ("text_encoder_2",) if kind == "sdxl" else ())


@pytest.mark.parametrize("arch", ["sd15", "sd2", "sdxl"])
def test_every_tensor_of_the_real_unets_has_an_original_name_diffusers_maps_back(arch):
    """The real architectures, on the meta device: diffusers' own converter turns our names back into the UNet's."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from test_sdxl import SDXL_UNET

    from erase.single_file import UNET_PREFIX, rename, unet_block_prefixes, unmapped
    from erase_lab.tiny import real_unet_on_meta

    if arch == "sdxl":
        from accelerate import init_empty_weights

        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(SDXL_UNET)
    else:
        unet = real_unet_on_meta(arch)
    table = unet_block_prefixes(unet.config)
    assert unmapped(unet.state_dict(), table) == []
    original = {UNET_PREFIX + k: v for k, v in rename(unet.state_dict(), table).items()}
    assert set(convert_ldm_unet_checkpoint(original, dict(unet.config))) == set(unet.state_dict())


def test_a_unet_without_an_original_layout_records_why_there_is_no_single_file(tmp_path):
    pipe = tiny_pipeline(time_cond_proj_dim=8)  # LCM's guidance embedding: time_embedding.cond_proj
    result = erase.erase(pipe, "church", progress=False, **FAST)
    record = json.loads((result.save(tmp_path / "lcm") / "erase.json").read_text())
    assert record["single_file"]["name"] is None and "unet.time_embedding.cond_proj" in record["single_file"]["why"]
    with pytest.raises(erase.EraseError, match="original Stable Diffusion layout has no name"):
        result.save(tmp_path / "required", single_file=True)
    assert not (tmp_path / "required").exists()


def test_apply_reproduces_the_run_and_refuses_another_base(erased_run, tmp_path, capsys):
    _, _, out, root = erased_run
    again = tmp_path / "again"
    assert main(["apply", "--patch", str(out / "patch.safetensors"), "--model", str(root / "base"),
                 "--out", str(again), "--quiet"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"wrote {again}/: README.md, again.safetensors, erase.json, patch.safetensors, unet/"
    first = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    second = UNet2DConditionModel.from_pretrained(again / "unet").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    record = json.loads((again / "erase.json").read_text())
    assert record["model"]["source"] == str(root / "base")
    assert record["erased_fingerprint"] == json.loads((out / "erase.json").read_text())["erased_fingerprint"]

    other = tmp_path / "other-base"
    tiny_pipeline(seed=1).save_pretrained(other)
    capsys.readouterr()
    code = main(["apply", "--patch", str(out / "patch.safetensors"), "--model", str(other), "--out",
                 str(tmp_path / "refused"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "was made for base sha256:" in err and "this model is sha256:" in err
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("header", [{"format": "erase.mask/0"}, {"format": "erase.mask/1"}])
def test_apply_refuses_foreign_or_corrupt_patches(erased_run, tmp_path, capsys, header):
    _, _, out, root = erased_run
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1, dtype=torch.uint8)}, str(tmp_path / "bad.safetensors"), metadata=header)
    code = main(["apply", "--patch", str(tmp_path / "bad.safetensors"), "--model", str(root / "base"), "--out",
                 str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and ("format" in err or "corrupt header" in err) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_apply_refuses_a_missing_output_directory(erased_run, tmp_path, capsys):
    _, _, out, root = erased_run
    code = main(["apply", "--patch", str(out / "patch.safetensors"), "--model", str(root / "base"), "--out",
                 str(tmp_path / "missing" / "out"), "--quiet"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_an_sdxl_single_file_picks_the_shipped_sdxl_base_config():
    """The real SDXL architecture on the meta device: the keys of its single file pick the shipped config, which is
    SDXL base 1.0's (the UNet of test_sdxl, CLIP-L and OpenCLIP bigG), so `--model FILE` needs no --model-config."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from test_sdxl import SDXL_UNET
    from transformers import CLIPTextModelWithProjection

    from erase.models import _shipped_config_for
    from erase.single_file import original_state_dict

    shipped = MODEL_CONFIGS / "sdxl"
    unet_config = json.loads((shipped / "unet" / "config.json").read_text())
    assert {k: unet_config[k] for k in SDXL_UNET} == SDXL_UNET
    with init_empty_weights():
        pipe = StableDiffusionXLPipeline(
            unet=UNet2DConditionModel.from_config(SDXL_UNET),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(shipped / "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(shipped / "text_encoder")),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(shipped / "text_encoder_2")),
            tokenizer=None, tokenizer_2=None, scheduler=None)
    state = original_state_dict(pipe)
    assert state["conditioner.embedders.1.model.token_embedding.weight"].shape == (49408, 1280)
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in state
    assert _shipped_config_for(list(state), Path("sdxl.safetensors")) == shipped
    refiner = [k.replace("embedders.1.", "embedders.0.") for k in state if k.startswith("conditioner.embedders.1.")]
    with pytest.raises(erase.EraseError, match="refiner.*--model-config"):
        _shipped_config_for(refiner, Path("refiner.safetensors"))


def test_sd2_text_layers_that_diffusers_drops_are_carried_from_the_loaded_file_into_the_export(tmp_path):
    """OpenCLIP-H's 24th layer (diffusers keeps 23) and its projection: a file loaded with them is exported with them,
    bit for bit; a pipeline from a diffusers folder has none, and its export writes none."""
    pipe = tiny_pipeline(sd2=True)
    save_configs(pipe, tmp_path / "base")
    save_single_file(pipe, tmp_path / "folder.safetensors", {"method": "none"})
    state = load_file(str(tmp_path / "folder.safetensors"))
    layer = "cond_stage_model.model.transformer.resblocks."
    extra = {k.replace(f"{layer}1.", f"{layer}23."): torch.randn_like(v) for k, v in state.items()
             if k.startswith(f"{layer}1.")}
    extra["cond_stage_model.model.text_projection"] = torch.randn(48, 48)
    save_file({**state, **extra}, str(tmp_path / "released.safetensors"))

    loaded = erase.load_pipeline(tmp_path / "released.safetensors", config=tmp_path / "base")
    assert_same_weights(pipe, loaded)
    save_single_file(loaded, tmp_path / "export.safetensors", {"method": "none"})
    written = load_file(str(tmp_path / "export.safetensors"))
    assert set(written) == set(state) | set(extra)
    assert all(torch.equal(written[k], v) for k, v in {**state, **extra}.items())
    save_single_file(loaded, tmp_path / "half.safetensors", {"method": "none"}, half=True)
    assert load_file(str(tmp_path / "half.safetensors"))[f"{layer}23.ln_1.weight"].dtype == torch.float16
    assert not any(k.startswith(f"{layer}23.") for k in state)
