"""The versions a result was made with, recorded in erase.json and in every report."""

from __future__ import annotations

import platform
import sys


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    from . import __version__

    return {"erase": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0],
            "platform": platform.platform()}
