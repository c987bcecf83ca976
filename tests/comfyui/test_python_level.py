"""The QSilk nodes inside real ComfyUI, Python level: ComfyUI's own KSampler on a tiny SD1.5 model."""

from __future__ import annotations

import copy

import comfyui_qsilk as pack
import pytest
import torch
from comfy_helpers import add_spy, flux_sample, ksample, tiny_flux, tiny_sd15
from workflows import QSILK_DEFAULTS

from qsilk import QSilk, QSilkConfig
from qsilk.attention.entropy import attention_entropy, entropy_to_confidence, normalized_entropy
from qsilk.integrations import comfyui as qc

# The QSilk node's widgets at their defaults (the tests pass preset and config_json themselves).
WIDGETS = {k: v for k, v in QSILK_DEFAULTS.items() if k not in ("preset", "config_json")}
STRONG = (
    '{"clamp_quantile": 0.02, "aqclip_tile": 4, "aqclip_stride": 2, "aqclip_k_min": 0.5, "aqclip_k_max": 1.0}'
)


def qsilk_node(model, config_json: str = "", **widgets):
    (patched,) = pack.QSilkNode.execute(
        model, preset="custom", config_json=config_json, **{**WIDGETS, **widgets}
    )
    return patched


def our_function(model) -> qc.QSilkPostCFG:
    (function,) = qc.find_post_cfg(model.model_options)
    return function


@pytest.fixture(scope="module")
def model():
    return tiny_sd15()


@pytest.fixture(scope="module")
def plain(model):
    return ksample(model)


def test_noop_config_is_bit_identical(model, plain):
    patched = qsilk_node(model, clamp=False, aqclip=False)
    assert torch.equal(ksample(patched), plain)
    json_noop = qsilk_node(model, config_json='{"clamp": false, "aqclip": false}')
    assert torch.equal(ksample(json_noop), plain)


def test_defaults_change_latents(model, plain):
    patched = qsilk_node(model)
    out = ksample(patched)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, plain)
    stats = our_function(patched).stats
    assert len(stats) == 4 and all(s["touched_fraction"] > 0 for s in stats)


def test_post_cfg_output_is_exactly_qsilk(model):
    before, after = [], []
    spied = add_spy(model, before)
    patched = add_spy(qsilk_node(spied, config_json=STRONG), after)
    ksample(patched, steps=5)
    config = our_function(patched).config
    assert len(before) == len(after) == 5
    sigmas = before[0]["sigmas"]
    for i, (seen, result) in enumerate(zip(before, after, strict=True)):
        progress = qc.progress_from_sigmas(seen["sigma"], sigmas)
        assert progress == pytest.approx(i / 4)  # evaluation i of 5 steps
        expected = QSilk(config)(seen["denoised"], progress=progress)
        assert torch.equal(result["denoised"], expected)
        assert not torch.equal(result["denoised"], seen["denoised"])


def test_original_model_is_never_modified(model, plain):
    options = copy.deepcopy(model.model_options)
    wrappers = copy.deepcopy(model.wrappers)
    patched = qsilk_node(model)
    attention = pack.QSilkAttentionConfidenceNode.execute(patched, max_queries=64, max_heads=2, ema=0.0)[0]
    ksample(attention)
    assert model.model_options == options and "sampler_post_cfg_function" not in model.model_options
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    assert model.wrappers == wrappers
    assert torch.equal(ksample(model), plain)


def rescale_cfg(model, multiplier=0.7):
    from comfy_extras.nodes_model_advanced import RescaleCFG

    return RescaleCFG().patch(model, multiplier)[0]


def test_chains_with_rescale_cfg_and_another_post_cfg(model):
    calls = []
    rescaled = rescale_cfg(model)
    both = add_spy(qsilk_node(rescaled, config_json=STRONG), calls)
    out_both = ksample(both)
    function = our_function(both)
    assert both.model_options["sampler_cfg_function"] is rescaled.model_options["sampler_cfg_function"]
    assert len(both.model_options["sampler_post_cfg_function"]) == 2
    assert len(calls) == 4 and len(function.stats) == 4
    # the second post-CFG function sees QSilk's output; QSilk sees RescaleCFG's guided x0
    assert function.stats[-1]["touched_fraction"] > 0
    out_rescale_only = ksample(rescaled)
    out_qsilk_only = ksample(qsilk_node(model, config_json=STRONG))
    assert not torch.equal(out_both, out_rescale_only)
    assert not torch.equal(out_both, out_qsilk_only)
    # node order does not matter: RescaleCFG applied after QSilk keeps QSilk's post-CFG function
    reversed_order = rescale_cfg(qsilk_node(model, config_json=STRONG))
    assert torch.equal(ksample(reversed_order), out_both)


def test_chains_with_apg(model):
    from comfy_extras.nodes_apg import APG

    apg = APG.execute(model, eta=0.5, norm_threshold=5.0, momentum=0.0)[0]
    both = qsilk_node(apg, config_json=STRONG)
    assert len(both.model_options["sampler_pre_cfg_function"]) == 1
    out = ksample(both)
    assert not torch.equal(out, ksample(apg)) and len(our_function(both).stats) == 4


def test_cfg_one(model):
    calls = []
    patched = add_spy(qsilk_node(model, config_json=STRONG), calls)
    out = ksample(patched, cfg=1.0)
    plain_cfg1 = ksample(model, cfg=1.0)
    assert "disable_cfg1_optimization" not in patched.model_options  # no extra unconditional pass
    assert len(calls) == 4 and all(not c["uncond_denoised"].any() for c in calls)  # uncond branch skipped
    assert torch.isfinite(out).all() and not torch.equal(out, plain_cfg1)


@pytest.mark.parametrize(
    ("sampler", "hw"),
    [
        ("euler", (8, 12)),
        ("dpmpp_2m", (8, 12)),
        ("heun", (8, 12)),
        ("euler", (64, 96)),
        ("dpmpp_2m", (64, 96)),
    ],
)
def test_samplers_and_non_square(model, sampler, hw):
    patched = qsilk_node(model, config_json=STRONG)
    out = ksample(patched, sampler=sampler, hw=hw, steps=3)
    plain = ksample(model, sampler=sampler, hw=hw, steps=3)
    assert out.shape == (1, 4, *hw) and torch.isfinite(out).all()
    assert not torch.equal(out, plain)
    progress = [s["progress"] for s in our_function(patched).stats]
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)


def test_attention_node_records_non_square_grid_and_changes_nothing(model):
    hw = (64, 96)
    plain = ksample(model, hw=hw, steps=2)
    attention = pack.QSilkAttentionConfidenceNode.execute(model, max_queries=64, max_heads=2, ema=0.0)[0]
    recorder = qc.find_attention(attention.model_options)
    assert torch.equal(ksample(attention, hw=hw, steps=2), plain)  # the override only reads q and k
    # the UNet's two attention levels, on the latent's true aspect: 32x48 and 16x24 tokens
    assert set(recorder.step_grids) == {(32, 48), (16, 24)}
    entropy = recorder.entropy(hw, 1)
    assert entropy.shape == (1, 1, *hw) and float(entropy.min()) > 0 and float(entropy.max()) <= 1


def test_attention_entropy_matches_an_independent_computation(model):
    seen = []

    def spy_override(func, *args, **kwargs):  # an override installed before ours: it must still be called
        seen.append((args[0].clone(), args[1].clone(), args[3], dict(kwargs["transformer_options"])))
        return func(*args, **kwargs)

    base = model.clone()
    base.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = spy_override
    attention = pack.QSilkAttentionConfidenceNode.execute(base, max_queries=10**6, max_heads=64, ema=0.0)[0]
    recorder = qc.find_attention(attention.model_options)
    ksample(attention, hw=(8, 12), steps=1)
    self_calls = [s for s in seen if s[0].shape[1] == s[1].shape[1]]
    assert len(self_calls) == len(recorder.step_records) > 0
    for (q, k, heads, options), record in zip(self_calls, recorder.step_records, strict=True):
        chunks = options["cond_or_uncond"]
        rows = q.shape[0] // len(chunks)
        cond = chunks.index(0)
        b, n, inner = q.shape
        qh = q[cond * rows : (cond + 1) * rows].view(rows, n, heads, inner // heads).transpose(1, 2).double()
        kh = k[cond * rows : (cond + 1) * rows].view(rows, n, heads, inner // heads).transpose(1, 2).double()
        p = torch.softmax(qh @ kh.transpose(-1, -2) / (inner // heads) ** 0.5, dim=-1)
        expected = -(p * p.log()).sum(-1) / torch.log(torch.tensor(float(n), dtype=torch.float64))
        h, w = record.grid_hw
        assert torch.allclose(record.normalized.double(), expected.view(rows, heads, h, w), atol=1e-5)


def test_attention_confidence_feeds_qsilk(model):
    attention = pack.QSilkAttentionConfidenceNode.execute(model, max_queries=64, max_heads=2, ema=0.0)[0]
    patched = qsilk_node(attention, confidence="attention", config_json=STRONG)
    recorder = qc.find_attention(patched.model_options)
    out = ksample(patched, hw=(16, 24), steps=2)
    function = our_function(patched)
    assert torch.isfinite(out).all()
    expected = entropy_to_confidence(recorder.last_entropy)
    assert torch.equal(function.last_confidence, expected)
    assert function.last_confidence.shape == (1, 1, 16, 24)
    assert torch.allclose(
        normalized_entropy(*attention_entropy(torch.ones(1, 2, 4), torch.ones(1, 3, 4))), torch.ones(1, 2)
    )


def test_flux_cfg1_joint_attention_on_an_odd_non_square_latent():
    flux = tiny_flux()
    assert qc.model_layout(flux) == ("text_first", 2)
    plain = flux_sample(flux)
    seen = []

    def spy_override(func, *args, **kwargs):
        seen.append((args[0].clone(), args[1].clone()))
        return func(*args, **kwargs)

    base = flux.clone()
    base.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = spy_override
    attention = pack.QSilkAttentionConfidenceNode.execute(base, max_queries=10**6, max_heads=64, ema=0.0)[0]
    recorder = qc.find_attention(attention.model_options)
    assert torch.equal(flux_sample(attention, steps=1), flux_sample(flux, steps=1))
    # 7x10 latent, 2x2 patches -> a 4x5 token grid (ComfyUI pads odd sides), after 7 text tokens
    assert recorder.step_grids == [(4, 5), (4, 5)]  # the double and the single block
    for (q, k), record in zip(seen, recorder.step_records, strict=True):
        p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)[:, :, 7:]
        expected = -(p * p.log()).sum(-1) / torch.log(torch.tensor(float(k.shape[-2]), dtype=torch.float64))
        assert torch.allclose(record.normalized.double(), expected.view(1, q.shape[1], 4, 5), atol=1e-5)
    patched = qsilk_node(
        attention, confidence="attention", config_json='{"aqclip_tile": 2, "aqclip_stride": 1}'
    )
    out = flux_sample(patched)
    function = our_function(patched)
    assert not torch.equal(out, plain) and torch.isfinite(out).all()
    assert [s["progress"] for s in function.stats] == [0.0, 0.5, 1.0]
    assert function.last_confidence.shape == (1, 1, 7, 10)


def test_preview_node_returns_images(model):
    patched = qsilk_node(model, config_json=STRONG)
    out = ksample(patched, hw=(8, 12), steps=3)
    confidence, change = pack.QSilkPreviewNode.execute(patched, {"samples": out}, upscale=8, normalize=True)
    assert confidence.shape == change.shape == (1, 64, 96, 3)
    function = our_function(patched)
    assert torch.equal(confidence[0, ::8, ::8, 0], function.last_confidence[0, 0])
    assert float(change.max()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no QSilk node"):
        pack.QSilkPreviewNode.execute(model, {"samples": out}, upscale=8, normalize=True)


def test_every_config_option_is_a_node_input():
    import dataclasses

    qsilk_inputs = {i.id for i in pack.QSilkNode.define_schema().inputs}
    attention_inputs = {i.id for i in pack.QSilkAttentionConfidenceNode.define_schema().inputs}
    for field in dataclasses.fields(QSilkConfig):
        name = field.name
        if name in qc.pair_fields():
            assert {f"{name}_start", f"{name}_end"} <= qsilk_inputs
        elif name == "attention_layers":  # diffusers module names: no ComfyUI equivalent (all calls are read)
            continue
        elif name.startswith("attention_"):
            assert name.removeprefix("attention_") in attention_inputs
        else:
            assert name in qsilk_inputs, name


def test_config_json_and_presets(model):
    patched = qsilk_node(model, config_json='{"clamp_quantile": 0.05, "confidence": null}')
    config = our_function(patched).config
    assert config.clamp_quantile == 0.05 and config.confidence is None and config.aqclip_tile == 16
    assert pack.QSilkNode.validate_inputs(preset="custom", config_json='{"clamp_quantile": 0.7}') != True  # noqa: E712
    message = pack.QSilkNode.validate_inputs(preset="custom", config_json="{oops")
    assert "malformed QSilk config JSON" in message
    with pytest.raises(ValueError, match="aqclip_k_min"):
        qsilk_node(model, aqclip_k_min=5.0, aqclip_k_max=1.0)
    if hasattr(QSilkConfig, "preset"):
        (preset_model,) = pack.QSilkNode.execute(model, preset="strong", config_json="", **WIDGETS)
        assert our_function(preset_model).config == QSilkConfig.preset("strong")
