"""One process of a data-parallel erase run (tests/test_trained_methods.py launches two with torchrun)."""

import os
import sys

import torch

import erase

QUICK = {"prompts_per_concept": 2, "images_per_prompt": 2, "sample_steps": 5, "batch_size": 2, "lr": 1e-3, "steps": 4}

if __name__ == "__main__":
    method, out = sys.argv[1], sys.argv[2]
    extra = {"warmup": 2, "update_every": 2} if method == "dynamic" else {"train": "attn2"}
    result = erase.erase(erase.load_pipeline("mini"), "church", method=method, progress=False, **QUICK, **extra)
    torch.save(dict(result.edit.values), os.path.join(out, f"values{os.environ['RANK']}.pt"))
