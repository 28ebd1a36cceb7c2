"""SDXL: target layers of the real architecture, and FIA end to end on a tiny SDXL pipeline."""

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

import erase
from erase.capture import CaptureSettings, capture
from erase.families import find_target_layers
from erase_lab.tiny import tiny_sdxl_pipeline

SDXL_UNET = {"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "sample_size": 128,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
             "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True, "in_channels": 4,
             "out_channels": 4}


def test_sdxl_architecture_has_seventy_ffn2_layers():
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(SDXL_UNET)
    layers = find_target_layers(unet, "*ff.net.2")
    shapes = [tuple(layer.weight.shape) for layer in layers.values()]
    assert len(layers) == 70  # 4 + 20 down, 10 mid, 30 + 6 up
    assert shapes.count((640, 2560)) == 10 and shapes.count((1280, 5120)) == 60


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


def test_sdxl_capture_feeds_added_conditioning(sdxl):
    calls = []
    handle = sdxl.unet.register_forward_hook(lambda m, a, k, o: calls.append(k["added_cond_kwargs"]), with_kwargs=True)
    layers = find_target_layers(sdxl.unet, "*ff.net.2")
    stats, timesteps = capture(sdxl, ["a church", "a dog"], layers, CaptureSettings(saliency_steps=3), progress=False)
    handle.remove()
    assert len(calls) == 3 and len(timesteps) == 3
    assert calls[0]["text_embeds"].shape == (4, 32) and calls[0]["time_ids"].shape == (4, 6)
    assert all(torch.isfinite(stats.mean(name)).all() for name in layers)


def test_fia_erases_on_sdxl_and_restores(sdxl):
    before = {n: p.clone() for n, p in sdxl.unet.named_parameters()}
    result = erase.erase(sdxl, "van gogh,church", progress=False, prompts_per_concept=3, saliency_steps=3,
                         fill="zeros")
    assert result.record["totals"]["edited"] > 0 and len(result.edit.masks) == 8  # 2 down, 2 mid, 4 up
    with result.applied() as pipe:
        for name, mask in result.edit.masks.items():
            assert torch.all(dict(pipe.unet.named_parameters())[name][mask] == 0)
        image = pipe("a church", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    assert all(torch.equal(p, before[n]) for n, p in sdxl.unet.named_parameters())
