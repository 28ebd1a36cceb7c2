"""The training methods (ESD, SalUn, dynamic masks) and the prompt attack on diffusion transformers, tiny SD3 and
Flux.1 dev and schnell: the transformer is called as its own pipeline calls it, the flow-matching noise is the
pipeline's, each method trains only what the family names for its train set and leaves the pipeline as it was, and
the saved transformer/ holds the edit."""

import json

import pytest
import torch

import erase
from erase.capture import CaptureSettings, first_calls
from erase.cli import main
from erase.data import ModelCache, SampleSettings, sample_latents
from erase.families import family_of
from erase.models import image_side
from erase.training import encode
from erase_lab.tiny import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

PIPELINES = {"sd3": tiny_sd3_pipeline, "flux-dev": lambda: tiny_flux_pipeline(guidance=True),
             "flux-schnell": lambda: tiny_flux_pipeline(guidance=False)}
SMALL = {"resolution": 32}
"""Flux.1's pipeline draws 256 px by default; 32 px is 64 image tokens, as tiny SD3's default."""
ESD = {"steps": 2, "sample_steps": 3, "lr": 1e-3, **SMALL}
DATA = {"steps": 2, "prompts_per_concept": 1, "images_per_prompt": 2, "sample_steps": 2, "batch_size": 2, "lr": 1e-3,
        **SMALL}
DYNAMIC = {**DATA, "warmup": 1, "update_every": 1}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path_factory.getbasetemp() / "erase-cache"))


@pytest.mark.parametrize("model", list(PIPELINES))
def test_predict_is_the_transformers_call_in_its_own_pipeline(model):
    """The trainer's call (conditioning from the prompt, timestep in the scheduler's scale, shared ids and guidance
    added) gives what the pipeline's own call gave at the same latents and step."""
    pipe = PIPELINES[model]()
    family = family_of(pipe)
    sampled = first_calls(pipe, ["a church in winter"], CaptureSettings(
        steps=4, saliency_steps=2, guidance_scale=family.guidance_scale(pipe), **SMALL))
    scheduler_scale = 1000 if family.name == "flux" else 1  # Flux's pipeline passes σ, SD3's 1000 σ
    t = torch.tensor([sampled.timesteps[-1] * scheduler_scale])
    conditioning = encode(pipe, ["a church in winter"], image_side(pipe, SMALL["resolution"]))
    with torch.no_grad():
        predicted = family.predict(pipe, pipe.transformer, sampled.model_input[-1:], t, conditioning)
    torch.testing.assert_close(predicted, sampled.cond, rtol=1e-4, atol=1e-5)


def test_flow_matching_noise_is_at_the_pipelines_own_shifted_levels():
    """Flux.1 dev shifts σ by the image's token count: the training noise levels on the grid points of a 4-step
    sampling are that sampling's σ, x_t lies on the line from x0 to ε at σ = t / 1000, and the target is ε − x0."""
    pipe = tiny_flux_pipeline()
    family, side = family_of(pipe), image_side(pipe, SMALL["resolution"])
    pipe("a church", num_inference_steps=4, height=side, width=side, output_type="latent")
    schedule = family.noise_schedule(pipe, side)
    torch.testing.assert_close(schedule.sigmas[[0, 250, 500, 750]], pipe.scheduler.sigmas[:4])
    x0 = torch.randn(3, *family.latents_shape(pipe, side))
    x_t, t, target = family.noised(schedule, x0, torch.Generator().manual_seed(0))
    sigma = (t / 1000)[:, None, None]
    noise = x0 + target
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * noise)
    assert x_t.shape == x0.shape and len(set(t.tolist())) == 3


def test_flux_training_images_are_cached_packed_as_the_pipeline_returns_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path))
    pipe = tiny_flux_pipeline()
    settings, prompts = SampleSettings(2, 2, 3.5, SMALL["resolution"], 0), [("a church", None)]
    first = sample_latents(pipe, prompts, settings, ModelCache("latents", pipe), progress=False)[0]
    again = sample_latents(pipe, prompts, settings, ModelCache("latents", pipe), progress=False)[0]
    tokens = (SMALL["resolution"] // (2 * pipe.vae_scale_factor)) ** 2
    assert first.shape == (2, tokens, pipe.transformer.config.in_channels) and torch.equal(first, again)
    assert "generating it again" not in capsys.readouterr().err  # read back, not sampled anew


@pytest.mark.parametrize(("model", "method", "concept", "settings", "parts"), [
    ("sd3", "esd", "church", {**ESD, "train": "esd-x"}, ("attention",)),
    ("flux-dev", "esd", "church", {**ESD, "train": "esd-x"}, ("attention",)),
    ("flux-schnell", "esd", "church", {**ESD, "train": "esd-u"}, ("rest",)),
    # nudity: one retain prompt (its anchor) where church has ten rivals, each sampled
    ("sd3", "salun", "nudity", {**DATA, "train": "unet"}, ("rest", "attention")),
    ("flux-dev", "salun", "nudity", {**DATA, "train": "attn2"}, ("attention",)),
    ("sd3", "dynamic", "church", DYNAMIC, ("attention",)),
    ("flux-schnell", "dynamic", "church", DYNAMIC, ("attention",)),
])
def test_training_methods_edit_only_the_familys_train_set_and_save_it(model, method, concept, settings, parts,
                                                                      tmp_path):
    pipe = PIPELINES[model]()
    transformer = pipe.transformer
    before = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    result = erase.erase(pipe, concept, method=method, progress=False, **settings)
    assert all(torch.equal(p, before[n]) for n, p in transformer.named_parameters())  # the pipeline as it was
    assert all(p.requires_grad for p in transformer.parameters())
    family = family_of(pipe)
    trainable = {n for part in parts for n in family.trainable(transformer, part)}
    with result.applied():
        moved = {n for n, p in transformer.named_parameters() if not torch.equal(p, before[n])}
        erased = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    assert moved and moved <= trainable
    curve = result.record["training_curve"]
    assert len(curve) >= 2 and all(torch.isfinite(torch.tensor(step["loss"])) for step in curve)
    guidance = result.config.start_guidance if method == "esd" else 3.5  # ESD's passes are its sampling's
    assert result.record.get("training_guidance") == (guidance if model == "flux-dev" else None)
    out = result.save(tmp_path / "run", single_file=False)
    reloaded = type(transformer).from_pretrained(out / "transformer")
    assert all(torch.equal(p, erased[n]) for n, p in reloaded.named_parameters())


def test_prompt_attack_runs_on_sd3(judge):
    pipe = tiny_sd3_pipeline()
    result = erase.erase(pipe, "church", method="esd", progress=False, **ESD)
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    report = erase.attack(pipe, result, kind="prompt", clip=judge, progress=False, prompts_per_concept=1, seeds=[0],
                          sample_steps=2, steps=1, tokens=2)
    assert all(torch.equal(p, before[n]) for n, p in pipe.transformer.named_parameters())
    (record,) = report.records
    words = record["words"].split()
    assert record["attacked_prompt"] == f"{record['prompt']} {record['words']}" and len(words) == 2
    assert len(pipe.tokenizer(record["words"], add_special_tokens=False).input_ids) == 2  # typeable CLIP words


def test_prompt_attack_refuses_a_model_that_reads_the_prompt_through_t5(judge):
    pipe = tiny_flux_pipeline()
    result = erase.erase(pipe, "church", method="esd", progress=False, **{**ESD, "steps": 1})
    with pytest.raises(erase.EraseError, match=r"through T5EncoderModel \(text_encoder_2\): attack it with "
                                               "kind='revival'"):
        erase.attack(pipe, result, kind="prompt", clip=judge, progress=False)


def test_cli_trains_esd_on_a_saved_sd3_folder(tmp_path, capsys):
    model, out = tmp_path / "tiny-sd3", tmp_path / "run"
    tiny_sd3_pipeline().save_pretrained(model, safe_serialization=True)
    assert main(["--concepts", "church", "--method", "esd", "--model", str(model), "--set", "steps=2",
                 "--set", "sample_steps=3", "--set", "lr=1e-3", "--no-single-file", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"wrote {out}/: README.md, erase.json, patch.safetensors, transformer/"
    record = json.loads((out / "erase.json").read_text())
    assert record["method"] == "esd" and len(record["training_curve"]) == 2
    pipe = erase.load_pipeline(str(model))
    family = family_of(pipe)
    saved = type(pipe.transformer).from_pretrained(out / "transformer")
    base = dict(pipe.transformer.named_parameters())
    moved = {n for n, p in saved.named_parameters() if not torch.equal(p, base[n])}
    assert moved and moved <= set(family.trainable(pipe.transformer, "attention"))


@pytest.mark.parametrize("method", ["salun", "dynamic"])  # esd: tests/test_families.py
def test_data_methods_refuse_a_transformer_family_they_cannot_train(method):
    pixart = tiny_pixart_pipeline()
    with pytest.raises(erase.EraseError, match=r"do not support .*: use fia or conceptprune"):
        erase.erase(pixart, "church", method=method, progress=False)
