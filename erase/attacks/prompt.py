"""Prompt attack, in the spirit of UnlearnDiffAtk (Zhang et al., 2024): a few words appended to a prompt that make
the erased model draw the concept again.

The erased denoiser is its own classifier, no other network is needed: the appended tokens are optimised so that the
erased denoiser, conditioned on prompt + tokens, denoises the original model's image of that prompt (its final
latents, noised at random timesteps) as well as it can, i.e. predicts the noise (or v, or a flow-matching model's
velocity) that was added. Optimisation runs in the text-embedding space through the nearest real tokens (PEZ, Wen et
al., 2023): each step the soft embeddings are projected to their nearest vocabulary entries, the loss is taken there,
and its gradient updates the soft ones. Projecting only at the end would lose most of what the soft prompt learnt (its
nearest tokens do something else); this way the discrete prompt, which anyone can type, is the one that was
optimised. Candidates are the tokenizer's whole lowercase words, which read back as the same tokens, so the attacked
prompt is plain text. The tokens are CLIP tokens: every text encoder of the model must read CLIP tokens (SD1/SD2/SDXL,
SD3 without T5).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import check_positive, check_positive_ints
from ..errors import EraseError
from ..families import family_of
from ..models import image_side
from ..training import rows
from . import register
from .core import AttackSettings, Target

PLACEHOLDER = "sks"
"""A one-token word that marks where the attack's tokens go in the tokenized prompt (the hook replaces it)."""
WORD = re.compile(r"[a-z]{2,}</w>")


@dataclass
class PromptAttackConfig(AttackSettings):
    """Prompt attack settings: a budget of `steps` optimisation steps of `tokens` appended tokens per prompt."""

    tokens: int = 5
    """Tokens appended to each attacked prompt (UnlearnDiffAtk optimises 5)."""
    steps: int = 40
    """Optimisation steps per attacked prompt: the attack's budget."""
    lr: float = 0.01
    """AdamW step in the text-embedding space."""
    timesteps: int = 1
    """Random timesteps (each with its own noise) per attacked prompt at every step; the loss averages them."""

    def validate(self) -> None:
        super().validate()
        check_positive_ints(self, "tokens", "steps", "timesteps")
        check_positive("lr", self.lr, "0.01")


def check_clip_tokens(pipe, kind: str) -> None:
    """Refuse a model that reads the prompt through other than CLIP tokens (T5: SD3 with it, Flux)."""
    for name, tokenizer, encoder in text_encoders(pipe):
        if tokenizer(PLACEHOLDER, add_special_tokens=False).input_ids != [placeholder_id(tokenizer)]:
            raise EraseError(f"the {kind} attack works on CLIP tokens and this model also reads the prompt through "
                             f"{type(encoder).__name__} ({name}): attack it with kind='revival', or load it without "
                             "that encoder where it runs without it (SD3 without T5: text_encoder_3=None)")


def check(pipe, prompts: list[str], config: PromptAttackConfig) -> None:
    """Refuse a model that reads the prompt through other than CLIP tokens, prompts that would not hold the attack's
    tokens, and prompts that already use the placeholder word."""
    check_clip_tokens(pipe, "prompt")
    tokenizer = pipe.tokenizer
    longest = max(len(ids) for ids in tokenizer(prompts, verbose=False).input_ids) + config.tokens
    if longest > tokenizer.model_max_length:
        raise EraseError(f"the attacked prompts would reach {longest} tokens and the text encoder reads "
                         f"{tokenizer.model_max_length}: lower tokens={config.tokens} or prompts_per_concept")
    if any(PLACEHOLDER in p.lower().split() for p in prompts):
        raise EraseError(f"a prompt contains the word {PLACEHOLDER!r}, which the prompt attack uses as its placeholder")


def text_encoders(pipe) -> list[tuple[str, object, torch.nn.Module]]:
    """(name, tokenizer, model) of every text encoder the pipeline has (SDXL has two, SD3 up to three)."""
    return [(f"text_encoder{suffix}", getattr(pipe, f"tokenizer{suffix}"), encoder) for suffix in ("", "_2", "_3")
            if (encoder := getattr(pipe, f"text_encoder{suffix}", None)) is not None]


def placeholder_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(f"{PLACEHOLDER}</w>")


def candidates(tokenizer) -> torch.Tensor:
    """Ids of the whole lowercase words of the vocabulary (≥ 2 letters): what an attacked token may become."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([i for i, t in enumerate(tokens) if WORD.fullmatch(t)])


@contextmanager
def substituted(encoders: list, placeholder: int, embeddings: list[torch.Tensor]):
    """Inside the block, each text encoder's token embedding of a row that holds the placeholder gives that row's
    next entry of `embeddings` ([rows, tokens, width], one per encoder) at the placeholder positions; the rows
    without it (the unconditional prompt) are untouched. The pipeline's own encode_prompt then conditions on them."""
    def hook(values: torch.Tensor):
        def replace(module, args, output):
            mask = args[0] == placeholder
            if not mask.any():
                return output
            if int(mask.sum()) != values.shape[0] * values.shape[1]:
                raise EraseError("the attacked prompts were cut short by the tokenizer: lower tokens")
            return output.masked_scatter(mask[..., None], values.to(output.dtype))
        return replace

    handles = [e.get_input_embeddings().register_forward_hook(hook(v)) for e, v in zip(encoders, embeddings)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@register("prompt", PromptAttackConfig, "appended tokens optimised with the erased denoiser's denoising loss "
          "(UnlearnDiffAtk-style, projected to real words)", check=check)
def run(pipe, edit, targets: list[Target], config: PromptAttackConfig, progress: bool = True) -> tuple[list[dict], object]:
    """For each target: the attacked prompt (its prompt + the words found), the words and the last step's loss; and
    the erasure's own edit, which the attacked prompts are generated with."""
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    encoders = [encoder for _, _, encoder in text_encoders(pipe)]
    tables = [e.get_input_embeddings().weight.detach() for e in encoders]
    vocab = candidates(pipe.tokenizer).to(tables[0].device)
    unit = [F.normalize(table[vocab].float(), dim=-1) for table in tables]
    side = image_side(pipe, config.resolution)
    schedule = family.noise_schedule(pipe, side)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    placeholder = placeholder_id(pipe.tokenizer)

    def project(soft: list[torch.Tensor]) -> torch.Tensor:
        """Nearest candidate word of each soft token (cosine, summed over the text encoders: SDXL and SD3 have
        two)."""
        return vocab[sum(F.normalize(s, dim=-1) @ u.T for s, u in zip(soft, unit)).argmax(-1)]

    found = []
    with edit.applied_to(denoiser), tqdm(total=len(targets) * config.steps, desc="attack", unit="step",
                                         disable=not progress) as bar:
        for start in range(0, len(targets), config.batch_size):
            batch = targets[start : start + config.batch_size]
            n = len(batch)
            prompts = [f"{t.prompt}{f' {PLACEHOLDER}' * config.tokens}" for t in batch]
            init = vocab[torch.randint(len(vocab), (n, config.tokens), generator=generator).to(vocab.device)]
            soft = [table[init].float().clone().requires_grad_() for table in tables]
            optimizer = torch.optim.AdamW(soft, lr=config.lr)
            x0 = torch.cat([torch.stack([t.latents for t in batch])] * config.timesteps)
            each = torch.arange(n).repeat(config.timesteps)
            for _ in range(config.steps):
                hard = [table[project(soft)].requires_grad_() for table in tables]
                with substituted(encoders, placeholder, hard):
                    cond = rows(family.conditioning(pipe, prompts, side), each)  # one row per draw
                x_t, t, target = family.noised(schedule, x0, generator)
                error = (family.predict(pipe, denoiser, x_t, t, cond).float() - target.float()).square().flatten(1).mean(1)
                loss = error.mean()
                for s, g in zip(soft, torch.autograd.grad(loss, hard)):  # PEZ: the projected tokens' gradient
                    s.grad = g.float()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(n)
            ids = project(soft)
            per_prompt = error.detach().view(config.timesteps, n).mean(0)
            for target, words, last in zip(batch, ids.tolist(), per_prompt.tolist()):
                text = " ".join(w.removesuffix("</w>") for w in pipe.tokenizer.convert_ids_to_tokens(words))
                found.append({"prompt": f"{target.prompt} {text}", "words": text, "loss": round(last, 6)})
    return found, edit
