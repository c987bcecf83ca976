"""qsilk.integrations.comfyui without ComfyUI: progress from sigmas, the post-CFG function on ComfyUI-shaped
arguments, the attention override on synthetic calls (both CFG orders, chaining), configs from node inputs, and
preview images. The same code inside real ComfyUI is tested in tests/comfyui (make test-comfyui)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qsilk import QSilk, QSilkConfig
from qsilk.attention.entropy import attention_entropy, normalized_entropy
from qsilk.integrations import comfyui as qc

SIGMAS = torch.tensor([14.6, 7.0, 2.9, 0.93, 0.03, 0.0])


def test_import_does_not_import_comfyui():
    code = "import sys, qsilk, qsilk.integrations.comfyui; print(any(m.split('.')[0] in ('comfy', 'comfy_api', 'nodes') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_progress_from_sigmas():
    steps = [qc.progress_from_sigmas(SIGMAS[i : i + 1], SIGMAS) for i in range(5)]
    assert steps == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    midway = (SIGMAS[1] + SIGMAS[2]) / 2  # a second-order sampler's intermediate evaluation
    assert qc.progress_from_sigmas(midway, SIGMAS) == pytest.approx(1.5 / 4)
    assert qc.progress_from_sigmas(20.0, SIGMAS) == 0.0
    assert qc.progress_from_sigmas(torch.tensor([0.93, 0.93]), SIGMAS) == pytest.approx(0.75)
    assert qc.progress_from_sigmas(5.0, [5.0, 0.0]) == 0.0  # one step
    with pytest.raises(ValueError, match="at least 2"):
        qc.progress_from_sigmas(1.0, [1.0])


def comfy_args(x0, sigma, sigmas=SIGMAS, options=None):
    transformer_options = {"sample_sigmas": sigmas, **(options or {})}
    return {
        "denoised": x0,
        "sigma": torch.tensor([float(sigma)]),
        "model_options": {"transformer_options": transformer_options},
    }


def test_post_cfg_is_qsilk_at_the_step_progress():
    config = QSilkConfig(clamp_quantile=0.02, aqclip_tile=4, aqclip_stride=2, aqclip_window=(0.4, 1.0))
    function = qc.QSilkPostCFG(config)
    x0 = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0)) * 3
    for i in range(5):
        out = function(comfy_args(x0, SIGMAS[i]))
        expected = QSilk(config)(x0, progress=i / 4)
        assert torch.equal(out, expected)
        assert function.stats[-1]["aqclip_active"] == (i / 4 >= 0.4)
    assert len(function.stats) == 5 and function.change_sum.shape == (2, 1, 8, 12)
    function(comfy_args(x0, SIGMAS[0], sigmas=SIGMAS.clone()))  # a new run (new sigmas): the record restarts
    assert len(function.stats) == 1


def test_post_cfg_noop_and_final_placement():
    x0 = torch.randn(1, 4, 8, 8) * 5
    assert qc.QSilkPostCFG(QSilkConfig.noop())(comfy_args(x0, SIGMAS[0])) is x0
    final = qc.QSilkPostCFG(QSilkConfig(placement="final"))
    assert final(comfy_args(x0, SIGMAS[0])) is x0
    assert torch.equal(final(comfy_args(x0, SIGMAS[4])), QSilk(QSilkConfig())(x0, progress=1.0))


def test_post_cfg_survives_deepcopy():  # ComfyUI deep-copies model_options on every clone
    import copy

    function = qc.QSilkPostCFG()
    options = {"sampler_post_cfg_function": [function]}
    assert copy.deepcopy(options)["sampler_post_cfg_function"][0] is function
    assert qc.find_post_cfg(copy.deepcopy(options)) == [function]


def attention_call(recorder, q, k, heads, chunks, hw, sigma=1.0, previous_out=None):
    """Drive the recorder as ComfyUI does: apply_model wrapper around the attention override."""
    calls = []

    def attention_function(q_, k_, v_, heads_, **kwargs):
        calls.append(kwargs)
        return torch.zeros(1)

    def model_forward(x, t, *rest, **kw):
        return recorder(attention_function, q, k, q, heads, transformer_options={"cond_or_uncond": chunks})

    out = recorder.apply_model_wrapper(model_forward, torch.zeros(1, 4, *hw), torch.tensor([sigma]))
    return out, calls


def independent_entropy(q, k, heads):
    b, n, inner = q.shape
    qh = q.view(b, n, heads, -1).transpose(1, 2).double()
    kh = k.view(b, n, heads, -1).transpose(1, 2).double()
    p = torch.softmax(qh @ kh.transpose(-1, -2) / (inner // heads) ** 0.5, dim=-1)
    return (-(p * p.log()).sum(-1) / torch.log(torch.tensor(float(n)))).mean(1)  # head mean, (b, n)


@pytest.mark.parametrize("chunks", [[0, 1], [1, 0]])
def test_attention_reads_the_conditional_rows_in_either_cfg_order(chunks):
    hw, heads = (4, 6), 2
    generator = torch.Generator().manual_seed(1)
    q_cond, k_cond = (
        torch.randn(1, 24, 8, generator=generator) * 3,
        torch.randn(1, 24, 8, generator=generator) * 3,
    )
    q_unc, k_unc = torch.zeros(1, 24, 8), torch.zeros(1, 24, 8)  # uniform attention: entropy 1
    parts = {0: (q_cond, k_cond), 1: (q_unc, k_unc)}
    q = torch.cat([parts[c][0] for c in chunks])
    k = torch.cat([parts[c][1] for c in chunks])
    recorder = qc.AttentionConfidence(max_queries=1000, max_heads=8)
    attention_call(recorder, q, k, heads, chunks, hw)
    assert recorder.step_grids == [hw]
    expected = independent_entropy(q_cond, k_cond, heads).view(1, 1, *hw).float()
    assert torch.allclose(recorder.entropy(hw, 1), expected, atol=1e-5)
    assert recorder.confidence(hw, 1).shape == (1, 1, *hw)


def test_attention_skips_cross_attention_and_uncond_only_calls():
    recorder = qc.AttentionConfidence()
    attention_call(recorder, torch.randn(2, 24, 8), torch.randn(2, 77, 8), 2, [1, 0], (4, 6))
    attention_call(recorder, torch.randn(1, 24, 8), torch.randn(1, 24, 8), 2, [1], (4, 6))
    assert recorder.step_calls == 0 and recorder.entropy((4, 6), 1) is None


def test_attention_chains_an_existing_override_and_returns_its_output():
    seen = []

    def previous(func, *args, **kwargs):
        seen.append(args[3])
        return "previous-result"

    recorder = qc.AttentionConfidence(previous=previous)
    out, direct = attention_call(recorder, torch.randn(1, 24, 8), torch.randn(1, 24, 8), 2, [0], (4, 6))
    assert out == "previous-result" and seen == [2] and direct == [] and recorder.step_calls == 1


def test_attention_text_first_layout_and_skip_reshape():
    """Flux-style joint attention: (B, heads, text + image, dim) with skip_reshape, patch 2, odd latent sides."""
    hw, text = (7, 10), 5
    grid = (4, 5)  # ceil(7/2), ceil(10/2)
    heads, dim = 2, 4
    q = torch.randn(1, heads, text + 20, dim)
    k = torch.randn(1, heads, text + 20, dim)
    recorder = qc.AttentionConfidence("text_first", 2, max_queries=1000, max_heads=8)

    def model_forward(x, t):
        return recorder(lambda *a, **kw: None, q, k, q, heads, skip_reshape=True, transformer_options={})

    recorder.apply_model_wrapper(model_forward, torch.zeros(1, 16, *hw), torch.tensor([1.0]))
    assert recorder.step_grids == [grid]
    entropy, log_keys = attention_entropy(q[:, :, text:], k)
    expected = normalized_entropy(entropy, log_keys).mean(1).view(1, 1, *grid)
    assert torch.allclose(recorder.step_records[0].normalized.mean(1, keepdim=True), expected, atol=1e-6)


def test_attention_new_run_resets():
    recorder = qc.AttentionConfidence()
    attention_call(recorder, torch.randn(1, 24, 8), torch.randn(1, 24, 8), 2, [0], (4, 6), sigma=1.0)
    recorder.confidence((4, 6), 1)
    attention_call(recorder, torch.randn(1, 24, 8), torch.randn(1, 24, 8), 2, [0], (4, 6), sigma=5.0)
    assert recorder.last_entropy is None and recorder.step_calls == 1


def test_config_from_inputs():
    widgets = {
        "clamp_quantile": 0.01,
        "clamp_window_start": 0.2,
        "clamp_window_end": 0.9,
        "confidence": "uniform",
    }
    config = qc.config_from_inputs(widgets, '{"aqclip_tile": 8}')
    assert config.clamp_quantile == 0.01 and config.clamp_window == (0.2, 0.9)
    assert config.confidence is None and config.aqclip_tile == 8
    with pytest.raises(ValueError, match="unknown QSilk config key"):
        qc.config_from_inputs({}, '{"clamp_q": 1}')
    with pytest.raises(ValueError, match="malformed"):
        qc.config_from_inputs({}, "{")
    with pytest.raises(ValueError, match="aqclip_stride"):
        qc.config_from_inputs({"aqclip_tile": 4, "aqclip_stride": 8})


def test_map_to_image_and_preview():
    values = torch.tensor([[[[0.0, 2.0], [1.0, 4.0]]]])
    image = qc.map_to_image(values, upscale=2)
    assert image.shape == (1, 4, 4, 3) and float(image.max()) == 1.0 and float(image[0, 0, 2, 0]) == 0.5
    assert float(qc.map_to_image(values, normalize=False).max()) == 1.0
    with pytest.raises(ValueError):
        qc.map_to_image(torch.zeros(1, 2, 2, 2))
    confidence, change = qc.preview_images(qc.QSilkPostCFG(), upscale=1, latent_hw=(3, 5))
    assert confidence.shape == change.shape == (1, 3, 5, 3) and not change.any()


def test_attention_options_in_the_qsilk_config_point_to_the_attention_node():
    with pytest.warns(RuntimeWarning, match="attention confidence' node"):
        qc.QSilkPostCFG(QSilkConfig(attention_max_queries=64))


def test_config_from_inputs_pairs_follow_the_config():
    import dataclasses

    from qsilk import config as qsilk_config

    pairs = qc.pair_fields()
    assert {"clamp_window", "aqclip_window"} <= set(pairs)
    for name in pairs:  # every (low, high) field of QSilkConfig round-trips through _start / _end widgets
        config = qc.config_from_inputs({f"{name}_start": 0.25, f"{name}_end": 0.75})
        assert getattr(config, name) == (0.25, 0.75)
    assert all(isinstance(getattr(QSilkConfig(), n), tuple) for n in pairs)
    assert len(pairs) == sum(
        isinstance(getattr(QSilkConfig(), f.name), tuple) and len(getattr(QSilkConfig(), f.name)) == 2
        for f in dataclasses.fields(QSilkConfig)
    )
    if getattr(qsilk_config, "AUTO", None):
        config = qc.config_from_inputs({"aqclip_tile": 4, "aqclip_stride": 2, "aqclip_auto_tile": True})
        assert config.aqclip_tile == config.aqclip_stride == "auto"
