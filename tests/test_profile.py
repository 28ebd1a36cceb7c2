"""A model's profile: the miniature model's defaults travel with its folder, and a damaged profile is refused."""

import json
import shutil

import pytest

import erase
from erase.profile import PROFILE_NAME, Profile, profile_of


def test_a_copy_of_the_miniature_model_keeps_its_defaults_and_records_its_version(tmp_path):
    folder = tmp_path / "my-mini"
    shutil.copytree(erase.models.MINI_PIPELINE_DIR, folder)
    pipe = erase.load_pipeline(folder)
    assert profile_of(pipe) == profile_of("mini") == profile_of(str(folder))
    assert profile_of(pipe).catalog == "mini" and profile_of(pipe).judge == "mini"
    record = erase.models.model_record(pipe)
    assert record["source"] == "mini" and record["version"] == "mini-2"  # not the machine path it was loaded from
    (folder / PROFILE_NAME).unlink()
    assert profile_of(str(folder)) == Profile()  # any other model: Stable Diffusion's defaults


@pytest.mark.parametrize("text", ["[1, 2]", '{"guidance": 2}', "{not json"])
def test_a_damaged_profile_is_refused_in_one_line(tmp_path, text):
    (tmp_path / PROFILE_NAME).write_text(text)
    with pytest.raises(erase.EraseError, match="not a valid erase profile") as refused:
        profile_of(tmp_path)
    assert "\n" not in str(refused.value)


def test_the_cli_reads_the_catalog_from_the_profile_before_loading(tmp_path, capsys):
    """A copy of the miniature model names its concepts in the mini catalog, as its folder's profile says."""
    folder = tmp_path / "my-mini"
    shutil.copytree(erase.models.MINI_PIPELINE_DIR, folder)
    code = erase.cli.main(["--concepts", "tench", "--model", str(folder), "--out", str(tmp_path / "run"), "--quiet",
                           "--set", "prompts_per_concept=2", "--set", "saliency_steps=2"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "erase.json").read_text())["catalog"] == "mini"


def test_an_sd3_profile_sets_how_many_t5_tokens_every_call_and_conditioning_reads(tmp_path):
    """SD3 without T5 pads its text with zero tokens where T5's go: 256 by default; a folder's profile may set fewer
    (the miniature SD3 is trained with 1), and then the pipeline call and the methods' conditioning both read that."""
    from erase.evaluation import generate
    from erase.families import family_of
    from erase_lab.tiny import tiny_sd3_pipeline

    folder = tmp_path / "sd3"
    tiny_sd3_pipeline().save_pretrained(folder)
    pipe = erase.load_pipeline(folder)
    family, clip_tokens = family_of(pipe), pipe.tokenizer.model_max_length
    assert family.text_embeddings(pipe, ["a cat"]).shape[1] == clip_tokens + 256
    (folder / PROFILE_NAME).write_text(json.dumps({"max_sequence_length": 3}))
    read = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: read.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    generate(pipe, ["a cat"], [0], steps=2, guidance_scale=2.0)
    assert read == [clip_tokens + 3] * 2
    assert family.conditioning(pipe, ["a cat"], 32)["encoder_hidden_states"].shape[1] == clip_tokens + 3
    assert family.text_embeddings(pipe, ["a cat"]).shape[1] == clip_tokens + 3
