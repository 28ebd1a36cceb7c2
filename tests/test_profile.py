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
