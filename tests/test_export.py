"""Export: the diffusers UNet, the patch and erase.json — read back as a user would."""

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

import erase
from erase_lab.tiny import tiny_pipeline

FAST = {"prompts_per_concept": 4, "saliency_steps": 3}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    result = erase.erase(tiny_pipeline(), "church,golf ball", progress=False, **FAST)
    out = result.save(tmp_path_factory.mktemp("runs") / "church")
    return result, out


def generate(pipe) -> torch.Tensor:
    return pipe("a church near the road", num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                output_type="pt").images


def test_exported_unet_generates_the_same_image_as_the_erased_pipeline(saved):
    result, out = saved
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    reloaded = StableDiffusionPipeline(**{**result.pipe.components, "unet": unet})
    with result.applied() as pipe:
        erased_image = generate(pipe)
    original_image = generate(result.pipe)
    assert torch.equal(generate(reloaded), erased_image)
    assert not torch.equal(original_image, erased_image)


def test_record_is_complete_json(saved):
    result, out = saved
    record = json.loads((out / "erase.json").read_text())
    for key in ("concepts", "prompts", "method", "config", "timesteps", "seed", "versions", "layers", "timings",
                "base_fingerprint", "erased_fingerprint"):
        assert key in record, key
    assert record["config"]["r2"] == 0.01 and record["config"]["saliency_steps"] == 3
    assert record["versions"]["torch"] == torch.__version__
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "church.safetensors", "erase.json", "patch.safetensors",
                                                   "unet"]
    assert record["single_file"] == {"name": "church.safetensors", "dtype": "native", "holds": "pipeline",
                                     "layout": "original Stable Diffusion checkpoint (A1111, ComfyUI, Forge)"}
    assert record["model"]["family"] == "unet" and record["model"]["denoiser"] == "UNet2DConditionModel"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial folders left


def test_patch_reapplied_to_the_base_reproduces_the_erased_weights(saved):
    result, out = saved
    base = tiny_pipeline()  # same seed: the same base weights
    erase.apply_patch(base, out / "patch.safetensors")
    exported = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    for name, tensor in base.unet.state_dict().items():
        assert torch.equal(tensor, exported[name]), name
    record = json.loads((out / "erase.json").read_text())
    assert erase.fingerprint(base.unet) == record["erased_fingerprint"]


PATCH_DOC = Path(__file__).parent.parent / "docs" / "PATCH_FORMAT.md"


def reference_reader() -> dict:
    """The reader docs/PATCH_FORMAT.md gives, run as written."""
    code = PATCH_DOC.read_text().split("## Reference reader", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, str(PATCH_DOC), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("method", ["fia", "fia-zeros", "uce"])
def test_the_documented_reader_decodes_every_patch_we_write(saved, tmp_path, method):
    """A reader written from the format's page alone, on masking patches (FIA: noise-filled by default, or zeros)
    and a value-setting (UCE) patch."""
    if method == "fia":
        out = saved[1]
    elif method == "fia-zeros":
        out = erase.erase(tiny_pipeline(), "church", progress=False, fill="zeros", **FAST).save(tmp_path / "zeros")
    else:
        out = erase.erase(tiny_pipeline(), "van gogh", method="uce", progress=False,
                          preserve=["claude monet"]).save(tmp_path / "uce")
    doc = reference_reader()
    edits, header = doc["read_erase_patch"](out / "patch.safetensors")
    assert any(values is not None for _, values in edits.values()) == (method != "fia-zeros")
    base = tiny_pipeline().unet
    assert header["base_fingerprint"] == erase.fingerprint(base)
    state = base.state_dict()
    doc["apply_erase_patch"](state, edits)
    assert erase.fingerprint(base) == header["erased_fingerprint"] == json.loads((out / "erase.json").read_text())[
        "erased_fingerprint"]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", PATCH_DOC.read_text(), re.MULTILINE))
    assert set(header) == documented


def test_patch_is_refused_on_another_base(saved):
    _, out = saved
    with pytest.raises(erase.EraseError, match="was made for base"):
        erase.apply_patch(tiny_pipeline(seed=1), out / "patch.safetensors")


def test_truncated_patch_is_refused(saved, tmp_path):
    _, out = saved
    data = (out / "patch.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(erase.EraseError, match="not a readable safetensors"):
        erase.read_patch(tmp_path / "cut.safetensors")


def test_out_folder_is_protected_and_overwrite_replaces_it(saved):
    result, out = saved
    with pytest.raises(erase.EraseError, match="--overwrite"):
        result.save(out)
    (out / "stale.txt").write_text("from an older run")
    result.save(out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "erase.json").exists()


def test_interrupted_save_leaves_nothing(saved, tmp_path, monkeypatch):
    result, _ = saved

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(erase.api, "save_patch", fail)
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []
    assert not result.edit.applied  # the in-memory pipeline is back to the original
