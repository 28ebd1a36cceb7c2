"""The model card (README.md) of a run folder: Hugging Face front matter, what was erased and how, how to load each
file, and the evaluation once there is one."""

import json

import pytest
import yaml

from erase.card import base_model, card
from erase.cli import main
from erase.models import MINI_PIPELINE_DIR

FAST = ["--set", "prompts_per_concept=2", "--set", "saliency_steps=2", "--quiet"]
EVAL_FAST = ["--retain", "golf ball", "--eval-set", "prompts_per_concept=2", "--eval-set", "steps=5"]


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An erasure of church on the shipped mini model, saved (not evaluated)."""
    out = tmp_path_factory.mktemp("runs") / "church-run"
    assert main(["--concepts", "church=>a building", "--out", str(out), *FAST]) == 0
    return out


def test_a_run_folder_has_a_model_card(run):
    text = (run / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "mini"  # the shipped model by its name, not by where it is installed
    assert {"concept-erasure", "stable-diffusion", "erase"} <= set(meta["tags"])
    assert meta["library_name"] == "diffusers" and "license" not in meta
    assert str(MINI_PIPELINE_DIR) not in text and str(run.parent) not in text
    assert "| church | object | a building |" in text and "`fia`" in text and "seed: 1244" in text
    assert 'UNet2DConditionModel.from_pretrained("church-run", subfolder="unet")' in text
    assert 'from_single_file("church-run.safetensors")' in text
    assert "erase-concepts apply --patch patch.safetensors --model mini" in text
    assert "keep it private" in text.lower() and "## Evaluation" not in text
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_evaluating_the_run_adds_its_numbers_to_the_card(run, capsys):
    assert main(["evaluate", str(run), *EVAL_FAST, "--quiet"]) == 0
    capsys.readouterr()
    summary = json.loads((run / "report" / "report.json").read_text())["metrics"]["summary"]
    text = (run / "README.md").read_text()
    assert front_matter(text)["base_model"] == "mini"
    assert "## Evaluation" in text and "CLIP `mini`" in text
    low, high = summary["forgetting_accuracy_ci"]
    assert f"| forgetting_accuracy | {summary['forgetting_accuracy']:.3f} [{low:.2f}, {high:.2f}] |" in text


def test_a_report_elsewhere_leaves_the_card_alone(run, tmp_path, capsys):
    before = (run / "README.md").read_text()
    assert main(["evaluate", str(run), *EVAL_FAST, "--out", str(tmp_path / "report"), "--quiet"]) == 0
    capsys.readouterr()
    assert (run / "README.md").read_text() == before


def test_a_lora_without_patch_is_in_the_card(tmp_path, capsys):
    out = tmp_path / "uce-run"
    assert main(["--concepts", "church", "--method", "uce", "--lora", "4", "--no-patch", "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    text = (out / "README.md").read_text()
    assert 'weight_name="uce-run-lora-r4.safetensors"' in text and "(rank 4," in text
    assert "patch.safetensors" not in text and "`uce`" in text


def test_the_card_of_a_reapplied_patch_says_where_its_settings_are(run):
    record = json.loads((run / "erase.json").read_text())
    text = card({**record, "config": None}, "again")  # `apply` knows the method from the patch, not its settings
    assert "those of the run that made the patch" in text and "```yaml" not in text


@pytest.mark.parametrize("source,expected", [
    ("runwayml/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    ("/home/someone/models/sd15", "sd15"),
    ("/home/someone/models/v1-5-pruned.safetensors", "v1-5-pruned.safetensors"),
])
def test_base_model_never_names_a_path_of_this_machine(source, expected):
    assert base_model(source) == expected
