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


def tiny_t5_tokenizer():
    """A T5 tokenizer (sentencepiece-style unigram) over a small vocabulary of whole words, built offline: every word
    of the catalogs' prompts is one piece, anything else falls back to single letters."""
    import re

    from transformers import T5Tokenizer

    catalogs = Path(erase.__file__).parent / "prompts"
    words = sorted({w for f in catalogs.glob("*.yaml") for w in re.findall(r"[a-z]+", f.read_text().lower())})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [("\u2581", -5.0)] + [(c, -8.0) for c in letters]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_t5_encoder(width: int = 32, vocab_size: int | None = None):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size or len(tiny_t5_tokenizer()), d_model=width, d_ff=37,
                                   d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()  # no dropout


def tiny_dit_vae(latent_channels: int = 16):
    """SD3/Flux's VAE shape (16 latent channels, shift and scale), tiny."""
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035)


def _clip_with_projection(width: int):
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=width, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, projection_dim=width, hidden_act="gelu"))


def tiny_sd3_pipeline(seed: int = 0, t5: bool = False):
    """An SD3-shaped tiny pipeline (MMDiT, flow matching, two CLIP encoders with projection; T5 only if `t5`, as SD3
    runs without it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                        pooled_projection_dim=64, out_channels=16, pos_embed_max_size=32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_dit_vae(),
        text_encoder=_clip_with_projection(32), tokenizer=erase.clip_tokenizer(),
        text_encoder_2=_clip_with_projection(32), tokenizer_2=erase.clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder() if t5 else None, tokenizer_3=tiny_t5_tokenizer() if t5 else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, guidance: bool = True):
    """A Flux.1-shaped tiny pipeline: double and single blocks, CLIP pooled + T5 sequence conditioning, guidance
    embedding (dev) or none (schnell)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    clip = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, hidden_act="gelu"))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_dit_vae(), text_encoder=clip,
                        tokenizer=erase.clip_tokenizer(), text_encoder_2=tiny_t5_encoder(),
                        tokenizer_2=tiny_t5_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipeline(seed: int = 0):
    """A PixArt-α-shaped tiny pipeline (T5 conditioning, cross-attention blocks with diffusers FeedForwards)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, norm_num_groups=8, cross_attention_dim=16, sample_size=16,
                                           patch_size=2, caption_channels=32)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    pipe = PixArtAlphaPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=tiny_t5_encoder(), vae=vae,
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_chroma_pipeline(seed: int = 0):
    """A Chroma-shaped tiny pipeline (Flux-like blocks, T5 only, modulation from an approximator)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
                                           approximator_hidden_dim=32, approximator_layers=1)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_dit_vae(),
                          text_encoder=tiny_t5_encoder(), tokenizer=tiny_t5_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_file_pipeline(seed: int = 0, t5: bool = False, sd35: bool = False):
    """An SD3-shaped tiny pipeline as SD3 single files hold it: CLIP-G wider than CLIP-L (diffusers' loader tells the
    two apart by width), CLIP-L's projection the identity (SD3 pools CLIP-L unprojected). `sd35`: SD3.5's q/k RMS
    norms and, in the first block, dual attention (SD3.5 medium's attn2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    clip_l, clip_g, context = 32, 48, 96
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=context, caption_projection_dim=32,
                                        pooled_projection_dim=clip_l + clip_g, out_channels=16, pos_embed_max_size=32,
                                        qk_norm="rms_norm" if sd35 else None, dual_attention_layers=(0,) if sd35 else ())
    text_encoder = _clip_with_projection(clip_l)
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(clip_l))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_dit_vae(),
        text_encoder=text_encoder, tokenizer=erase.clip_tokenizer(),
        text_encoder_2=_clip_with_projection(clip_g), tokenizer_2=erase.clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(context).eval() if t5 else None, tokenizer_3=tiny_t5_tokenizer() if t5 else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_dit_configs(pipe, folder: Path) -> None:
    """Only the configs of a DiT pipeline (model_index.json, each model's and the scheduler's config) and the
    tokenizers erase cannot build offline (T5's): what from_single_file needs besides the file."""
    from transformers import PreTrainedModel

    pipe.save_config(folder)
    for name, component in pipe.components.items():
        kind = type(component).__name__
        if component is None or kind == "CLIPTokenizer":  # erase builds CLIP tokenizers offline
            continue
        if "Tokenizer" in kind:
            component.save_pretrained(folder / name)
        elif isinstance(component, PreTrainedModel):
            component.config.save_pretrained(folder / name)
        else:
            component.save_config(folder / name)  # diffusers models and schedulers


def real_flux_on_meta(name: str):
    """The real Flux.1 transformer (flux-dev / flux-schnell) from the shipped config, with weights on the meta
    device."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    config = json.loads((MODEL_CONFIGS / name / "transformer" / "config.json").read_text())
    with init_empty_weights():
        return FluxTransformer2DModel.from_config(config)


def flux_at_reader_width(guidance: bool = True, seed: int = 0):
    """The smallest FluxTransformer2DModel diffusers' single-file reader takes, in float16: its converter splits the
    single blocks' fused linear1 at Flux.1's width (3072, MLP ratio 4) whatever the config says, so this is Flux.1
    with one block of each kind (546M parameters, about 1 GiB). Every row of every tensor holds one seeded random
    value: cheap to fill, and a row moved anywhere by a conversion shows."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                             pooled_projection_dim=768, guidance_embeds=guidance)
    transformer = transformer.to(torch.float16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in transformer.parameters():
            rows = torch.randn(param.shape[0], generator=generator).to(torch.float16)
            param.copy_(rows.view(-1, *[1] * (param.dim() - 1)).expand_as(param))
    return transformer.eval()
