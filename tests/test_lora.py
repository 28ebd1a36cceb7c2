"""--lora RANK: a training method's edit as a kohya LoRA, read back by diffusers' load_lora_weights into the original
pipeline, and named as ComfyUI's LoRA loader maps keys. Masking methods are refused."""

import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import erase
from erase.cli import main
from erase.edits import MaskEdit
from erase.lora import save_lora, to_lora
from erase.single_file import rename, unet_block_prefixes
from erase_lab.tiny import tiny_pipeline, tiny_sdxl_pipeline

ESD_U = {"method": "esd", "train": "esd-u", "steps": 3, "sample_steps": 4, "lr": 1e-3}  # convs, Linears and biases


def generate(pipe) -> torch.Tensor:
    return pipe("a church near the road", num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                output_type="pt").images


def lora_file(out) -> str:
    return str(out / json.loads((out / "erase.json").read_text())["lora"]["name"])


def loaded(make, path, fuse: bool):
    """A fresh original pipeline with the LoRA file loaded by diffusers (fused into the weights, or as adapters)."""
    pipe = make()
    pipe.load_lora_weights(path)
    if fuse:
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # after fuse_lora: the fused weights stay, the adapter layers go
    return pipe


@pytest.fixture(scope="module")
def esd_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    result = erase.erase(tiny_pipeline(), "church", progress=False, **ESD_U)
    return result, result.save(root / "full", lora="full"), result.save(root / "r2", lora=2)


def test_full_rank_uce_lora_reproduces_the_erased_unet_and_its_image(tmp_path):
    """UCE edits Linear weights only (no biases): at full rank the LoRA is the whole edit."""
    result = erase.erase(tiny_pipeline(), "van gogh", method="uce", progress=False, preserve=["claude monet"])
    out = result.save(tmp_path / "vg", lora="full")
    assert json.loads((out / "erase.json").read_text())["lora"]["dropped"] < 1e-5
    with result.applied() as erased:
        image = generate(erased)
        weights = {name: p.detach().clone() for name, p in erased.unet.named_parameters()}
    assert torch.allclose(generate(loaded(tiny_pipeline, lora_file(out), fuse=False)), image, atol=1e-5)
    fused = dict(loaded(tiny_pipeline, lora_file(out), fuse=True).unet.named_parameters())
    assert set(fused) == set(weights)
    for name, weight in weights.items():
        assert torch.allclose(fused[name], weight, atol=1e-6), name


def test_full_rank_lora_of_convs_is_their_edit_and_leaves_the_biases_out(esd_run):
    """ESD-u trains 3x3 and 1x1 convs, Linears and biases: the LoRA holds every weight's delta, no bias's."""
    result, out, _ = esd_run
    record = json.loads((out / "erase.json").read_text())["lora"]
    original = tiny_pipeline().unet.state_dict()
    fused = dict(loaded(tiny_pipeline, lora_file(out), fuse=True).unet.named_parameters())
    with result.applied() as erased:
        erased_weights = {name: p.detach().clone() for name, p in erased.unet.named_parameters()}
    biases = [name for name in result.edit.masks if name.endswith(".bias")]
    convs = [name for name in result.edit.masks if name.endswith(".weight") and erased_weights[name].dim() == 4]
    assert biases and convs and {f"{name}.weight" for name in record["layers"]} == set(result.edit.masks) - set(biases)
    for name in record["layers"]:
        assert torch.allclose(fused[f"{name}.weight"], erased_weights[f"{name}.weight"], atol=1e-6), name
    assert all(torch.equal(fused[name], original[name]) for name in biases)
    bias_norm = sum(float((erased_weights[n] - original[n]).square().sum()) for n in record["not_lora"]) ** 0.5
    assert record["dropped_by_rank"] < 1e-5
    assert record["dropped_not_lora"] == pytest.approx(bias_norm / record["delta_norm"], rel=1e-4)


def test_low_rank_error_is_the_svd_tail(esd_run):
    result, _, out = esd_run
    record = json.loads((out / "erase.json").read_text())["lora"]
    assert record["rank"] == record["file_rank"] == 2 and record["dropped_by_rank"] > 0
    fused = dict(loaded(tiny_pipeline, lora_file(out), fuse=True).unet.named_parameters())
    with result.applied() as erased:
        erased_weights = {name: p.detach().clone() for name, p in erased.unet.named_parameters()}
    tails = []
    for name, layer in record["layers"].items():
        error = float((fused[f"{name}.weight"] - erased_weights[f"{name}.weight"]).norm())
        assert error == pytest.approx(layer["dropped"] * layer["norm"], rel=1e-3, abs=1e-6), name
        tails.append(error ** 2)
    assert sum(tails) ** 0.5 / record["delta_norm"] == pytest.approx(record["dropped_by_rank"], rel=1e-3)


def dense_edit(unet) -> MaskEdit:
    """Every UNet tensor moved by seeded noise: a delta on every layer kind the architecture has."""
    generator = torch.Generator().manual_seed(5)
    old = {name: p.detach().clone() for name, p in unet.named_parameters()}
    return MaskEdit.from_weights({n: p + 0.01 * torch.randn(p.shape, generator=generator) for n, p in old.items()}, old)


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_full_rank_lora_of_every_layer_loads_into_sd2_and_sdxl(kind, tmp_path):
    """SD2 (Linear projections) and SDXL (original-layout names, add_embedding, conv_in/out, time embedding)."""
    make = (lambda: tiny_pipeline(sd2=True)) if kind == "sd2" else tiny_sdxl_pipeline
    unet = make().unet
    edit = dense_edit(unet)
    lora = to_lora(unet, edit, "full")
    save_lora(tmp_path / "lora.safetensors", lora, {"method": "test"})
    fused = dict(loaded(make, tmp_path / "lora.safetensors", fuse=True).unet.named_parameters())
    with edit.applied_to(unet):
        for name in lora.modules:
            assert torch.allclose(fused[name], dict(unet.named_parameters())[name], atol=1e-6), name
    assert "add_embedding.linear_1.weight" in lora.modules or kind == "sd2"


# ComfyUI reads a LoRA key `lora_unet_X` (comfy/lora.py, model_lora_keys_unet) when X is, dots as underscores and
# ".weight" cut, either (1) the name of a weight in its own UNet state dict, which has the original SD layout (the
# single file's `model.diffusion_model.` names, checked against diffusers' from_single_file in test_single_file.py),
# or (2) a diffusers name that comfy/utils.py unet_to_diffusers maps, i.e. one of:
COMFY_DIFFUSERS = re.compile(
    r"(?:(?:down|up)_blocks\.\d+\.resnets\.\d+|mid_block\.resnets\.[01])\.(?:conv1|conv2|time_emb_proj|conv_shortcut"
    r"|norm1|norm2)|(?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.(?:proj_in|proj_out|norm"
    r"|transformer_blocks\.\d+\.(?:norm[123]|attn[12]\.to_(?:q|k|v|out\.0)|ff\.net\.(?:0\.proj|2)))"
    r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv|conv_in|conv_out|conv_norm_out"
    r"|time_embedding\.linear_[12]|add_embedding\.linear_[12]|class_embedding\.linear_[12]")


def comfy_key_map(unet) -> dict[str, str]:
    """LoRA module key → the UNet weight (diffusers name) ComfyUI patches with it."""
    weights = [name for name in unet.state_dict() if name.endswith(".weight")]
    original = rename({name: name for name in weights}, unet_block_prefixes(unet.config))
    keys = {"lora_unet_" + key.removesuffix(".weight").replace(".", "_"): name for key, name in original.items()}
    keys.update({"lora_unet_" + name.removesuffix(".weight").replace(".", "_"): name for name in weights
                 if COMFY_DIFFUSERS.fullmatch(name.removesuffix(".weight"))})
    return keys


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_every_key_is_one_comfyui_maps_to_the_weight_it_patches(kind, esd_run, tmp_path):
    if kind == "sd1":
        unet, path = tiny_pipeline().unet, lora_file(esd_run[1])
    else:
        unet, path = tiny_sdxl_pipeline().unet, tmp_path / "lora.safetensors"
        save_lora(path, to_lora(unet, dense_edit(unet), 4), {"method": "test"})
    tensors, key_map, weights = load_file(str(path)), comfy_key_map(unet), unet.state_dict()
    modules = {key.split(".")[0] for key in tensors}
    assert modules and all(f"{m}.alpha" in tensors and f"{m}.lora_up.weight" in tensors for m in modules)
    for module in modules:
        assert module in key_map, module
        up, down = tensors[f"{module}.lora_up.weight"], tensors[f"{module}.lora_down.weight"]
        assert (up.flatten(1) @ down.flatten(1)).shape == weights[key_map[module]].flatten(1).shape, module


def test_masking_methods_are_refused_before_any_work(esd_run, tmp_path, capsys, monkeypatch):
    with pytest.raises(erase.EraseError, match="sparse mask is not low-rank"):
        replace(esd_run[0], method="fia").save(tmp_path / "fia", lora=4)
    assert not (tmp_path / "fia").exists()
    monkeypatch.setattr("erase.models.load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    for method in ("fia", "conceptprune"):
        code = main(["--concepts", "church", "--method", method, "--lora", "4", "--out", str(tmp_path / method)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "sparse mask is not low-rank" in err, err
        assert not (tmp_path / method).exists()


def test_cli_writes_the_lora_and_says_what_it_leaves_out(tmp_path, capsys):
    tiny_pipeline().save_pretrained(tmp_path / "model")
    out = tmp_path / "vg"
    assert main(["--concepts", "van gogh", "--method", "uce", "--model", str(tmp_path / "model"), "--out", str(out),
                 "--lora", "2", "--no-single-file", "--quiet"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "erase.json").read_text())["lora"]
    assert record["name"] == "vg-lora-r2.safetensors" and (out / record["name"]).is_file()
    assert re.search(r"LoRA vg-lora-r2.safetensors \(rank 2, \d+ layers\): leaves out [\d.e+-]+% of the edit's", printed)
    assert printed.strip().splitlines()[-1].startswith("wrote") and "vg-lora-r2.safetensors" in printed
    again = tmp_path / "again"  # the patch re-applied with --lora gives the same LoRA
    assert main(["apply", "--patch", str(out / "patch.safetensors"), "--model", str(tmp_path / "model"), "--out",
                 str(again), "--lora", "2", "--no-single-file", "--quiet"]) == 0
    first, second = load_file(str(out / record["name"])), load_file(str(again / "again-lora-r2.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
