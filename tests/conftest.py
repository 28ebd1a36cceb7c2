import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tiny import tiny_pipeline  # noqa: E402


@pytest.fixture
def pipe():
    return tiny_pipeline()


@pytest.fixture
def pipe_sd2():
    return tiny_pipeline(sd2=True)
