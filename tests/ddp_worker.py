"""One process of a multi-process erase run (tests launch two with torchrun): the training methods train
data-parallel; the masking methods capture a share of the concepts each."""

import json
import os
import sys

import torch

import erase

QUICK = {"prompts_per_concept": 2, "images_per_prompt": 2, "sample_steps": 5, "batch_size": 2, "lr": 1e-3, "steps": 4}
MASKING_CONCEPTS = ["church", "golf ball", "van gogh"]  # two kinds: base prompt sets split across the processes too
MASKING_QUICK = {"prompts_per_concept": 2, "saliency_steps": 2}


def launch_two(method: str, out) -> None:
    """This file as two CPU processes under torchrun; each writes what it ended with under `out`."""
    import subprocess

    env = {**os.environ, "ERASE_CACHE": str(out / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, method,
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


if __name__ == "__main__":
    method, out = sys.argv[1], sys.argv[2]
    rank = os.environ["RANK"]
    if method in ("fia", "conceptprune"):
        result = erase.erase(erase.load_pipeline("mini"), MASKING_CONCEPTS, method=method, progress=False,
                             **MASKING_QUICK)
        torch.save(dict(result.edit.masks), os.path.join(out, f"masks{rank}.pt"))
        record = {k: result.record[k] for k in ("prompts", "concept_masks", "fusion", "processes")}
        with open(os.path.join(out, f"record{rank}.json"), "w") as f:
            json.dump(record, f)
    else:
        extra = {"warmup": 2, "update_every": 2} if method == "dynamic" else {"train": "attn2"}
        result = erase.erase(erase.load_pipeline("mini"), "church", method=method, progress=False, **QUICK, **extra)
        torch.save(dict(result.edit.values), os.path.join(out, f"values{rank}.pt"))
