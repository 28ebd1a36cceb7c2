"""Tiny Stable Diffusion pipelines built from config with fixed seeds (as diffusers' own tests do)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import erase

MODEL_CONFIGS = Path(erase.__file__).parent / "model_configs"


def tiny_pipeline(sd2: bool = False, seed: int = 0, **unet_options) -> StableDiffusionPipeline:
    """SD1.x-shaped (768→32-d text, conv projections) or SD2.x-shaped (linear projections, wider text) tiny pipeline;
    `unet_options` go to the UNet (e.g. time_cond_proj_dim=8: an LCM-distilled UNet, which no single file holds)."""
    torch.manual_seed(seed)
    text_dim = 48 if sd2 else 32
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=(2, 4) if sd2 else 8, norm_num_groups=8,
        use_linear_projection=sd2, **unet_options)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=text_dim, intermediate_size=64,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu"))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=erase.clip_tokenizer(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def real_unet_on_meta(name: str) -> UNet2DConditionModel:
    """The real SD UNet architecture (sd15 / sd2) from the shipped config, with weights on the meta device."""
    from accelerate import init_empty_weights

    config = json.loads((MODEL_CONFIGS / name / "unet" / "config.json").read_text())
    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def save_configs(pipe, folder: Path) -> None:
    """Only the configs of a pipeline (model_index.json and each component's config): what from_single_file needs."""
    pipe.save_config(folder)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(folder / name)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).config.save_pretrained(folder / name)


def tiny_sdxl_pipeline(seed: int = 0, width_2: int = 32):
    """An SDXL-shaped tiny pipeline: two text encoders, pooled embeddings and size/crop conditioning. `width_2`: the
    second encoder's width (diffusers' single-file loader tells the two apart by width: pass another than 32)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=32 + width_2, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    config = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
                  num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, projection_dim=32, hidden_act="gelu")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**config)),
                                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**{**config,
                                                                                                  "hidden_size": width_2})),
                                     tokenizer=erase.clip_tokenizer(), tokenizer_2=erase.clip_tokenizer(),
                                     scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
