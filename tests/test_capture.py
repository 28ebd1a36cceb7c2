"""Capture: which layers, how many UNet calls, and the statistics themselves."""

import pytest
import torch

import erase
from erase.capture import CaptureSettings, capture, column_norms, cosine_scores, cpu_threads
from erase.families import find_target_layers
from erase_lab.tiny import real_unet_on_meta

SD_FFN2_SHAPES = [(320, 1280)] * 2 + [(640, 2560)] * 2 + [(1280, 5120)] * 2 + [(1280, 5120)] * 1 \
    + [(1280, 5120)] * 3 + [(640, 2560)] * 3 + [(320, 1280)] * 3


@pytest.mark.parametrize("arch", ["sd15", "sd2"])
def test_real_architectures_have_sixteen_ffn2_layers(arch):
    layers = find_target_layers(real_unet_on_meta(arch), "*ff.net.2")
    assert len(layers) == 16
    assert sorted(tuple(layer.weight.shape) for layer in layers.values()) == sorted(SD_FFN2_SHAPES)
    assert sum(layer.weight.numel() for layer in layers.values()) == 49_561_600


def test_unknown_target_pattern_is_refused(pipe):
    with pytest.raises(erase.EraseError, match="no Linear layer"):
        find_target_layers(pipe.unet, "*nothing*")


@pytest.mark.parametrize("prompts,batch_size", [(3, 8), (5, 2)])
def test_capture_makes_exactly_t_unet_calls_per_batch(pipe, prompts, batch_size):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    settings = CaptureSettings(saliency_steps=4, batch_size=batch_size)
    layers = find_target_layers(pipe.unet, "*ff.net.2")
    threads_before = torch.get_num_threads()
    stats, timesteps = capture(pipe, [f"a photo of thing {i}" for i in range(prompts)], layers, settings,
                               progress=False)
    handle.remove()
    assert torch.get_num_threads() == threads_before  # the statistics' one thread is given back after each call
    batches = -(-prompts // batch_size)
    assert len(calls) == 4 * batches
    assert sum(calls) == 4 * 2 * prompts  # every call carries both CFG halves of its prompts
    assert len(timesteps) == 4 and stats.count == prompts
    assert all(stats.mean(name).shape[0] == 4 for name in layers)


def test_column_norms_match_definition():
    x = torch.randn(4, 5, 6)  # 2 prompts × CFG halves, 5 tokens, 6 channels
    rows = x / x.norm(dim=-1, keepdim=True)
    expected = torch.stack([torch.cat([rows[p], rows[2 + p]]).norm(dim=0) for p in range(2)])
    assert torch.allclose(column_norms(x, 2), expected, atol=1e-6)


def test_cosine_scores_match_definition():
    x, w = torch.randn(2, 5, 6), torch.randn(3, 6)  # 1 prompt × CFG halves
    rows = torch.cat([x[0], x[1]])
    rows = rows / rows.norm(dim=-1, keepdim=True)
    y = rows @ w.T
    expected = torch.empty(3, 6)
    for i in range(3):
        for j in range(6):
            cos = torch.dot(rows[:, j], y[:, i]) / (rows[:, j].norm() * y[:, i].norm())
            expected[i, j] = w[i, j].abs() * rows[:, j].norm() * cos.abs()
    assert torch.allclose(cosine_scores(x, w, 1)[0], expected, atol=1e-5)


def test_every_prompt_starts_from_the_same_noise(pipe):
    """Identical prompts in one batch give identical statistics: no per-prompt noise."""
    layers = find_target_layers(pipe.unet, "*ff.net.2")
    settings = CaptureSettings(saliency_steps=2)
    one, _ = capture(pipe, ["a red car"], layers, settings, progress=False)
    three, _ = capture(pipe, ["a red car"] * 3, layers, settings, progress=False)
    for name in layers:
        assert torch.allclose(three.std(name), torch.zeros_like(three.std(name)), atol=1e-5)
        assert torch.allclose(three.mean(name), one.mean(name), atol=1e-5)


@pytest.mark.parametrize("statistics_threads,expected", [(1, 1), (None, 2)])
def test_statistics_run_on_their_own_thread_count_and_the_unet_on_torchs(pipe, statistics_threads, expected):
    threads_before, threads = torch.get_num_threads(), {}
    torch.set_num_threads(2)
    layers = find_target_layers(pipe.unet, "*ff.net.2")

    def record(key):
        def hook(*_):
            threads.setdefault(key, torch.get_num_threads())
        return hook

    handles = [pipe.unet.register_forward_pre_hook(record("unet")),
               next(iter(layers.values())).module.register_forward_hook(record("layer after the statistics"))]
    try:
        settings = CaptureSettings(saliency_steps=1, statistics_threads=statistics_threads)
        capture(pipe, ["a red car"], layers, settings, progress=False)
        with pytest.raises(RuntimeError), cpu_threads(torch.device("cpu"), statistics_threads):
            threads["inside"] = torch.get_num_threads()
            raise RuntimeError("the thread count comes back on errors too")
        assert threads == {"unet": 2, "layer after the statistics": 2, "inside": expected}
        assert torch.get_num_threads() == 2
    finally:
        for handle in handles:
            handle.remove()
        torch.set_num_threads(threads_before)
