"""Diffusion transformers through the family adapters: FIA, ConceptPrune and UCE on tiny SD3, Flux.1 (dev and
schnell) and two generic diffusers transformers (PixArt-α, Chroma), through the API and the CLI; what each edits,
the diffusers folder and the patch read back, evaluation, and the refusals where a method or export does not apply."""

import json

import pytest
import torch

import erase
from erase.cli import main
from erase.families import family_of
from erase_lab.tiny import tiny_chroma_pipeline, tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

FAST = {"prompts_per_concept": 2, "saliency_steps": 2, "steps": 4, "resolution": 32}
CLI_FAST = ["--quiet", *(a for k, v in FAST.items() for a in ("--set", f"{k}={v}"))]
BUILDERS = {"sd3": tiny_sd3_pipeline, "flux-dev": tiny_flux_pipeline,
            "flux-schnell": lambda: tiny_flux_pipeline(guidance=False), "pixart": tiny_pixart_pipeline,
            "chroma": tiny_chroma_pipeline}


def moved(before: dict, after: dict) -> dict[str, torch.Tensor]:
    """name → where the tensor changed, for the tensors that changed."""
    return {n: before[n] != after[n] for n in before if not torch.equal(before[n], after[n])}


def transformer_of(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny pipeline saved as a diffusers folder (SD3 without T5, as users keep it)."""
    folders = {}

    def folder(name):
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp("models") / name
            BUILDERS[name]().save_pretrained(folders[name])
        return folders[name]
    return folder


@pytest.mark.parametrize("name", ["sd3", "flux-dev", "flux-schnell"])
def test_fia_through_the_cli_edits_only_the_feed_forward_neurons(name, saved, tmp_path):
    model, out = saved(name), tmp_path / "run"
    assert main(["--concepts", "church,van gogh", "--model", str(model), "--out", str(out), "--no-single-file",
                 *CLI_FAST]) == 0
    record = json.loads((out / "erase.json").read_text())
    pipe = erase.load_pipeline(model)
    family = family_of(pipe)
    assert record["model"]["family"] == family.name and record["model"]["denoiser"] == type(pipe.transformer).__name__
    assert record["sampler"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert record["sampler"]["guidance"] == {"sd3": "cfg", "flux-dev": "distilled", "flux-schnell": "none"}[name]
    changed = moved(pipe.transformer.state_dict(), transformer_of(out))
    targets = family.ffn_targets(pipe.transformer)
    assert changed and {n.removesuffix(".weight") for n in changed} <= set(targets)
    if name.startswith("flux"):  # the single blocks' proj_out: only the columns of the MLP's hidden units move
        inner = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
        single = [where for n, where in changed.items() if n.startswith("single_transformer_blocks")]
        assert single and all(not where[:, :inner].any() for where in single)
    again = tmp_path / "again"  # the patch re-applies to the base and writes the same transformer
    assert main(["apply", "--patch", str(out / "patch.safetensors"), "--model", str(model), "--out", str(again),
                 "--no-single-file", "--quiet"]) == 0
    assert all(torch.equal(t, transformer_of(out)[n]) for n, t in transformer_of(again).items())


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_uce_edits_the_context_embedder_alone_towards_the_anchor(name):
    from erase.methods.uce import last_token_embeddings

    pipe = BUILDERS[name]()
    family = family_of(pipe)
    assert family.text_tokenizer(pipe) is (pipe.tokenizer_2 if name == "flux-dev" else pipe.tokenizer)
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    result = erase.erase(pipe, "van gogh", method="uce", progress=False, lam=0.1, preserve=["claude monet"])
    concept, anchor, kept = last_token_embeddings(pipe, ["van gogh", "a painting", "claude monet"])
    with result.applied():
        after = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    assert set(moved(before, after)) == {"context_embedder.weight"}
    old, new = before["context_embedder.weight"], after["context_embedder.weight"]
    target = old @ anchor
    assert (new @ concept - target).norm() < 0.25 * (old @ concept - target).norm()
    assert (new @ kept - old @ kept).norm() < 0.25 * (old @ kept).norm()
    assert all(torch.equal(p, before[n]) for n, p in pipe.transformer.named_parameters())  # restored


@pytest.mark.parametrize("name", ["pixart", "chroma"])
def test_a_generic_transformer_is_erased_through_its_feed_forwards(name, saved, tmp_path):
    from diffusers.models.attention import FeedForward

    pipe = erase.load_pipeline(saved(name))
    assert family_of(pipe).name == "transformer"
    result = erase.erase(pipe, "church", method="conceptprune" if name == "chroma" else "fia", progress=False, **FAST)
    feedforwards = {n for n, m in pipe.transformer.named_modules() if isinstance(m, FeedForward)}
    assert result.edit.masks and all(n.removesuffix(".net.2.weight") in feedforwards for n in result.edit.masks)
    out = result.save(tmp_path / "run")
    record = json.loads((out / "erase.json").read_text())
    assert record["single_file"]["name"] is None and "no single-file layout" in record["single_file"]["why"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "erase.json", "patch.safetensors", "transformer"]
    assert "subfolder=\"transformer\"" in (out / "README.md").read_text()
    with pytest.raises(erase.EraseError, match="UCE has no default layers"):
        erase.erase(pipe, "church", method="uce", progress=False)
    with pytest.raises(erase.EraseError, match="do not support"):
        erase.erase(pipe, "church", method="esd", progress=False, steps=1)
    with pytest.raises(erase.EraseError, match="no single-file layout"):
        result.save(tmp_path / "single", single_file=True)


def test_an_sd3_folder_without_t5_loads_with_t5_absent(saved):
    index = json.loads((saved("sd3") / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None]
    pipe = erase.load_pipeline(saved("sd3"))
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None


def test_evaluation_and_revival_run_on_a_transformer(judge):
    pipe = tiny_sd3_pipeline()
    result = erase.erase(pipe, "church", progress=False, fill="zeros", **FAST)
    report = erase.evaluate(pipe, result, clip=judge, progress=False, prompts_per_concept=1, steps=2, seeds=[0],
                            resolution=32)
    assert report.settings["guidance_scale"] == 7.0  # SD3's own, from its family
    assert 0 <= report.metrics["summary"]["forgetting_accuracy"] <= 1
    attacked = erase.attack(pipe, result, kind="revival", clip=judge, progress=False, prompts_per_concept=1,
                            sample_steps=2, seeds=[0], resolution=32)
    assert attacked.records and attacked.records[0]["revived"] > 0


def test_capture_in_bfloat16_scores_the_same_layers():
    pipe = tiny_flux_pipeline().to(torch.bfloat16)
    result = erase.erase(pipe, "church", progress=False, **FAST)
    assert result.record["model"]["dtype"] == "torch.bfloat16"
    assert all(mask.shape == pipe.transformer.get_parameter(n).shape for n, mask in result.edit.masks.items())
    assert any(n.startswith("single_transformer_blocks") for n in result.edit.masks)


@pytest.mark.parametrize("name, blocks, single", [("sd3-medium", 24, 0), ("sd35-medium", 24, 0), ("sd35-large", 38, 0),
                                                  ("flux-dev", 19, 38), ("flux-schnell", 19, 38)])
def test_the_real_architectures_have_every_target_the_family_names(name, blocks, single):
    """On the meta device, from the shipped configs: both streams' feed-forwards in every joint block (the last SD3
    block has no text feed-forward), every Flux single block's MLP columns, and UCE's context embedder."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from erase.families import FAMILIES
    from erase.models import SINGLE_FILE_CONFIGS

    config = json.loads((SINGLE_FILE_CONFIGS / name / "transformer" / "config.json").read_text())
    family = FAMILIES["flux" if single else "sd3"]
    with init_empty_weights():
        model = (FluxTransformer2DModel if single else SD3Transformer2DModel).from_config(config)
    targets = family.ffn_targets(model)
    text_streams = blocks if single else blocks - 1
    assert len(targets) == blocks + text_streams + single
    hidden = 4 * model.config.num_attention_heads * model.config.attention_head_dim
    assert all(t.weight.shape[1] == hidden for t in targets.values())  # the feed-forwards' hidden units, nothing else
    assert list(family.text_projections(model, "text")) == ["context_embedder"]
    assert len(family.trainable(model, "attention")) > 0 and len(family.trainable(model, "rest")) > 0


def test_an_sd3_single_file_runs_through_the_cli_and_exports_one_that_diffusers_reads(tmp_path):
    """--model FILE (SAI's layout) with --model-config: erased, exported as a file in the same layout, read back by
    diffusers' own from_single_file to the erased transformer/."""
    from diffusers import SD3Transformer2DModel

    from erase.families.sd3_file import save_single_file
    from erase_lab.tiny import save_dit_configs, tiny_sd3_file_pipeline

    base = tiny_sd3_file_pipeline()
    save_single_file(base, tmp_path / "base.safetensors", {})
    save_dit_configs(base, tmp_path / "configs")
    out = tmp_path / "run"
    assert main(["--concepts", "church", "--model", str(tmp_path / "base.safetensors"), "--model-config",
                 str(tmp_path / "configs"), "--out", str(out), *CLI_FAST]) == 0
    record = json.loads((out / "erase.json").read_text())
    assert record["model"]["family"] == "sd3" and record["model"]["sha256"].startswith("sha256:")
    assert record["single_file"]["layout"] == "SAI / ComfyUI SD3 checkpoint"
    read = SD3Transformer2DModel.from_single_file(str(out / "run.safetensors"), config=str(tmp_path / "configs"),
                                                  subfolder="transformer", local_files_only=True).state_dict()
    erased = transformer_of(out)
    assert set(read) == set(erased) and all(torch.equal(read[n], erased[n]) for n in erased)
    assert moved(base.transformer.state_dict(), erased)


def test_a_flux_transformer_file_loads_with_its_base_folder_and_is_refused_without(tmp_path):
    """A BFL file holds the transformer alone: --model-config (the base model's folder) gives the text encoders and
    the VAE; without it, one line says so."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from erase.families.flux_file import save_single_file
    from erase_lab.tiny import flux_at_reader_width, tiny_dit_vae, tiny_t5_encoder, tiny_t5_tokenizer

    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=1, vocab_size=49408, max_position_embeddings=77))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_dit_vae(), text_encoder=clip.half(),
                        tokenizer=erase.clip_tokenizer(), text_encoder_2=tiny_t5_encoder(width=4096).half(),
                        tokenizer_2=tiny_t5_tokenizer(), transformer=flux_at_reader_width())
    pipe.save_pretrained(tmp_path / "base")
    save_single_file(pipe, tmp_path / "flux.safetensors", {})
    with pytest.raises(erase.EraseError, match="holds no text encoders or VAE.*--model-config"):
        erase.load_pipeline(tmp_path / "flux.safetensors")
    loaded = erase.load_pipeline(tmp_path / "flux.safetensors", config=tmp_path / "base")
    assert family_of(loaded).name == "flux" and loaded.source_sha256.startswith("sha256:")
    expected = pipe.transformer.state_dict()
    assert all(torch.equal(t, expected[n]) for n, t in loaded.transformer.state_dict().items())
