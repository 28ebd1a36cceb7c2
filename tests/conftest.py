import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "ERASE_CACHE" not in os.environ:  # never the user's cache; made once (xdist's workers inherit it), removed at the end
    os.environ["ERASE_CACHE"] = tempfile.mkdtemp(prefix="erase-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ERASE_CACHE"], ignore_errors=True)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core (-n auto): a thread each, not several fighting
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from erase_lab.tiny import tiny_pipeline


@pytest.fixture
def pipe():
    return tiny_pipeline()


@pytest.fixture
def pipe_sd2():
    return tiny_pipeline(sd2=True)


@pytest.fixture(scope="module")
def judge():
    """A tiny untrained open_clip judge: the evaluator's and attacks' mechanics, not what they measure."""
    import open_clip
    import torch

    from erase.evaluation import Judge

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                     "head_width": 16},
                           text_cfg={"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1})
    preprocess = open_clip.image_transform(32, is_train=False)
    return Judge(model, preprocess, open_clip.tokenizer.SimpleTokenizer(), name="tiny-random", pretrained=None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny pipeline, FIA's erasure of church on it, and that erasure saved as a run folder."""
    import erase

    pipe = tiny_pipeline()
    result = erase.erase(pipe, "church", progress=False, prompts_per_concept=2, saliency_steps=2)
    return pipe, result, result.save(tmp_path_factory.mktemp("runs") / "church")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The shipped miniature pipeline, with a cache of its own for the module's evaluations."""
    import os

    import erase

    os.environ["ERASE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return erase.load_pipeline("mini")
