"""A saved run folder is checked as a whole before any model loads: its patch must be the one its erase.json
describes, every header field of the right type, every mask and value well formed and finite. What only the model
can tell (the weights' shapes and dtype) is refused right after it loads, before a weight changes. Each bad folder is
crafted from the real run of the `run` fixture; the command line (exit 2, one line, nothing written) and the API
(EraseError) refuse it alike."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import erase
from erase.cli import main
from erase_lab.bad_inputs import files
from erase_lab.tiny import tiny_pipeline

FAST = {"prompts_per_concept": 1, "steps": 1, "seeds": [0], "resolution": 16}  # a quick evaluation


@pytest.fixture(scope="module")
def model(run, tmp_path_factory) -> Path:
    """The run's base model saved as a diffusers folder, for --model."""
    folder = tmp_path_factory.mktemp("model") / "model"
    run[0].save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def dog_patch(run, tmp_path_factory) -> Path:
    """The patch of another run on the same base: FIA's erasure of dog."""
    result = erase.erase(run[0], "dog", progress=False, prompts_per_concept=1, saliency_steps=1)
    return result.save(tmp_path_factory.mktemp("runs") / "dog", single_file=False) / "patch.safetensors"


def copied_run(run, folder: Path) -> Path:
    """What evaluate and attack read of the run: erase.json and patch.safetensors."""
    folder.mkdir()
    for name in ("erase.json", "patch.safetensors"):
        shutil.copy(run[2] / name, folder / name)
    return folder


def rewrite_patch(path: Path, header, tensors) -> Path:
    """The patch at `path` with its header (a map of strings) and tensors changed."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    save_file(tensors(load_file(str(path))), str(path), metadata=header(metadata))
    return path


def each_values(change):
    return lambda tensors: {k: change(v) if k.endswith(":values") else v for k, v in tensors.items()}


def each_mask(change):
    return lambda tensors: {k: v if k.endswith(":values") else change(v) for k, v in tensors.items()}


def field(key: str, value):
    return lambda header: {**header, key: value if isinstance(value, str) else json.dumps(value)}


def without(key: str):
    return lambda header: {k: v for k, v in header.items() if k != key}


def shapes(change):
    return lambda header: {**header, "shapes": json.dumps({k: change(v) for k, v in json.loads(header["shapes"]).items()})}


def first_concept(**fields):
    return lambda header: {**header, "concepts": json.dumps([{**json.loads(header["concepts"])[0], **fields}])}


def unchanged(header_or_tensors):
    return header_or_tensors


def one_values_dropped(tensors):
    dropped = min(k for k in tensors if k.endswith(":values"))
    return {k: v for k, v in tensors.items() if k != dropped}


BAD_PATCHES = [  # name, header change, tensor change, a fragment of the one line it is refused with
    ("values all NaN", unchanged, each_values(lambda v: torch.full_like(v, float("nan"))), "are not all finite"),
    ("one value infinite", unchanged, each_values(lambda v: torch.cat([v[:-1], v[-1:] * float("inf")])), "not all finite"),
    ("one value too few", unchanged, each_values(lambda v: v[:-1]), "floating-point numbers, one per bit set"),
    ("values of whole numbers", unchanged, each_values(lambda v: v.to(torch.int32)), "floating-point numbers"),
    ("values 2-D", unchanged, each_values(lambda v: v[:, None]), "floating-point numbers"),
    ("values of one mask missing", unchanged, one_values_dropped, "masks, values and shapes disagree"),
    ("mask not uint8 bits", unchanged, each_mask(lambda m: m.float()), "uint8 bytes"),
    ("mask 2-D", unchanged, each_mask(lambda m: m[:, None]), "uint8 bytes"),
    ("mask of another shape's size", shapes(lambda s: [s[0] * 2, *s[1:]]), unchanged, "uint8 bytes"),
    ("format unknown", field("format", "erase.mask/9"), unchanged, "this erase reads 'erase.mask/1'"),
    ("shapes not JSON", field("shapes", "{"), unchanged, "corrupt header: its shapes is not valid JSON"),
    ("shapes a list", field("shapes", [[320, 1280]]), unchanged, "shapes is [[320, 1280]], not an object"),
    ("a shape a string", shapes(lambda s: "ab"), unchanged, 'is "ab", not a list of positive whole numbers'),
    ("a shape of fractions", shapes(lambda s: [1.5]), unchanged, "not a list of positive whole numbers"),
    ("a shape negative", shapes(lambda s: [-s[0], *s[1:]]), unchanged, "not a list of positive whole numbers"),
    ("concepts a string", field("concepts", "church"), unchanged, "corrupt header: its concepts is not valid JSON"),
    ("concepts a JSON string", field("concepts", '"church"'), unchanged, 'concepts is "church", not a list'),
    ("concepts a list of names", field("concepts", ["church"]), unchanged, "does not list its concepts"),
    ("a concept's name a number", first_concept(name=5), unchanged, "does not list its concepts"),
    ("a concept's anchor null", first_concept(anchor=None), unchanged, "does not list its concepts"),
    ("no method", without("method"), unchanged, "corrupt header (it has no method)"),
    ("method empty", field("method", ""), unchanged, 'method is "", not a string (non-empty)'),
    ("no base fingerprint", without("base_fingerprint"), unchanged, "it has no base_fingerprint"),
    ("erased fingerprint not a hash", field("erased_fingerprint", "sha256:xyz"), unchanged,
     "erased_fingerprint 'sha256:xyz' is not sha256:<64 hex digits>"),
    ("no erase_version", without("erase_version"), unchanged, "it has no erase_version"),
]


@pytest.fixture
def bad(request, run, tmp_path) -> tuple[Path, str]:
    """A copy of the run whose patch is made bad as the case says; the fragment it is refused with."""
    _, header, tensors, expect = request.param
    folder = copied_run(run, tmp_path / "run")
    rewrite_patch(folder / "patch.safetensors", header, tensors)
    return folder, expect


def refused(argv: list[str], top: Path, capsys) -> str:
    """The one line `argv` is refused with (exit 2), after checking it wrote and removed nothing under `top`."""
    before = files(top)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("erase-concepts: error: "), err
    assert files(top) == before
    return err


@pytest.mark.parametrize("bad", BAD_PATCHES, ids=[case[0] for case in BAD_PATCHES], indirect=True)
def test_a_malformed_patch_is_refused_in_one_line_by_every_reader(bad, run, model, tmp_path, capsys):
    folder, expect = bad
    patch = folder / "patch.safetensors"
    for argv in (["evaluate", str(folder), "--model", str(model), "--quiet"],
                 ["attack", str(folder), "--model", str(model), "--quiet"],
                 ["apply", "--patch", str(patch), "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"]):
        assert expect in refused(argv, tmp_path, capsys), argv
    pipe = run[0]
    for call in (lambda: erase.read_patch(patch), lambda: erase.apply_patch(pipe, patch),
                 lambda: erase.evaluate(pipe, folder), lambda: erase.attack(pipe, folder)):
        with pytest.raises(erase.EraseError, match="^[^\n]*$") as caught:
            call()
        assert expect in str(caught.value)
    assert erase.fingerprint(pipe.unet) == run[1].record["base_fingerprint"]  # no weight changed


def test_a_patch_from_another_run_is_refused_naming_both_runs(run, model, dog_patch, tmp_path, capsys):
    """dog's patch under church's erase.json would be evaluated as church's erasure with dog's edit."""
    folder = copied_run(run, tmp_path / "run")
    shutil.copy(dog_patch, folder / "patch.safetensors")
    for argv in (["evaluate", str(folder), "--model", str(model), "--quiet"],
                 ["attack", str(folder), "--model", str(model), "--quiet"]):
        err = refused(argv, tmp_path, capsys)
        assert "patch.safetensors is not this run's patch: it says concepts dog, erased_fingerprint sha256:" in err
        assert "erase.json says concepts church, erased_fingerprint sha256:" in err
        assert "put back the patch the run wrote" in err
    for call in (lambda: erase.evaluate(run[0], folder), lambda: erase.attack(run[0], folder)):
        with pytest.raises(erase.EraseError, match="is not this run's patch"):
            call()


@pytest.mark.parametrize("key, value", [("method", "uce"), ("base_fingerprint", "sha256:" + "0" * 64),
                                        ("erased_fingerprint", "sha256:" + "1" * 64)])
def test_a_patch_and_record_that_disagree_on_any_field_are_refused(run, model, key, value, tmp_path, capsys):
    folder = copied_run(run, tmp_path / "run")
    record = json.loads((folder / "erase.json").read_text())
    (folder / "erase.json").write_text(json.dumps({**record, key: value}))
    err = refused(["evaluate", str(folder), "--model", str(model), "--quiet"], tmp_path, capsys)
    assert f"is not this run's patch: it says {key} {record[key][:19]}" in err and f"says {key} {value[:19]}" in err


@pytest.mark.parametrize("key", ["erased_fingerprint", "method"])
def test_a_record_without_a_field_the_patch_is_checked_against_is_refused(run, model, key, tmp_path, capsys):
    folder = copied_run(run, tmp_path / "run")
    record = json.loads((folder / "erase.json").read_text())
    (folder / "erase.json").write_text(json.dumps({k: v for k, v in record.items() if k != key}))
    assert f"erase.json lacks {key}" in refused(["evaluate", str(folder), "--model", str(model), "--quiet"],
                                                tmp_path, capsys)


SHAPE_SWAPPED = (shapes(lambda s: s[::-1]), unchanged, "the edit's mask is bool [")
HALF_VALUES = (unchanged, each_values(lambda v: v.half()), "the edit's values are float16")


@pytest.mark.parametrize("header, tensors, expect", [SHAPE_SWAPPED, HALF_VALUES], ids=["mask transposed", "values half"])
def test_a_patch_that_does_not_fit_the_weights_is_refused_before_any_weight_changes(run, judge, model, header, tensors,
                                                                                    expect, tmp_path, capsys):
    """Masks of another shape than their weight's (the same number of bits) and values of another dtype are well
    formed: only the model tells, so they are refused right after it loads."""
    folder = copied_run(run, tmp_path / "run")
    patch = rewrite_patch(folder / "patch.safetensors", header, tensors)
    assert expect in refused(["apply", "--patch", str(patch), "--model", str(model), "--out", str(tmp_path / "out"),
                              "--quiet"], tmp_path, capsys)
    pipe = tiny_pipeline()
    base = erase.fingerprint(pipe.unet)
    with pytest.raises(erase.EraseError, match=expect.replace("[", r"\[")):
        erase.apply_patch(pipe, patch)
    assert erase.fingerprint(pipe.unet) == base
    with pytest.raises(erase.EraseError, match=expect.replace("[", r"\[")):
        erase.evaluate(pipe, folder, retain=[], clip=judge, progress=False, **FAST)
    assert erase.fingerprint(pipe.unet) == base


def test_an_edit_with_a_mask_that_is_not_boolean_is_refused_before_any_weight_changes(run):
    pipe, result, _ = run
    base = erase.fingerprint(pipe.unet)
    masks = {name: mask.float() for name, mask in result.edit.masks.items()}
    with pytest.raises(erase.EraseError, match="the edit's mask is float32"):
        erase.MaskEdit(masks, result.edit.values).apply(pipe.unet)
    assert erase.fingerprint(pipe.unet) == base


def test_the_untouched_run_still_applies_and_evaluates(run, judge, model, tmp_path, capsys):
    pipe, result, folder = run
    out = tmp_path / "out"
    assert main(["apply", "--patch", str(folder / "patch.safetensors"), "--model", str(model), "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads((out / "erase.json").read_text())["erased_fingerprint"] == result.record["erased_fingerprint"]
    report = erase.evaluate(pipe, folder, retain=[], clip=judge, progress=False, **FAST)
    assert report.settings["concepts"] == [c.as_dict() for c in result.concepts]
