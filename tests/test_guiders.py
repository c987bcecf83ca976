"""Baselines on the demo pipeline: diffusers guiders in place of the pipeline's CFG, thresholding baselines, the
reference QSilk formulas, QSilk variants and their compositions (qsilk.baselines, qsilk.study.methods)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler  # noqa: E402
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance  # noqa: E402

from qsilk.baselines import MimicScaleGuidance, imagen_thresholding, mimic_scale_threshold  # noqa: E402
from qsilk.study.methods import PARTS, get_method, method_names  # noqa: E402
from tiny_pipelines import tiny_demo_pipeline  # noqa: E402

STEPS = 4
CFG = 6.0


@pytest.fixture(scope="module")
def pipe():
    return tiny_demo_pipeline()


def sample(pipe, output_type="pt", steps=STEPS, **kwargs) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    return pipe([0, 4, 9], num_inference_steps=steps, generator=generators, output_type=output_type, **kwargs).images


@pytest.fixture(scope="module")
def plain(pipe):
    return sample(pipe, output_type="latent", guidance_scale=CFG)


# ---------------------------------------------------------------------------------------------- guider parity


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize("scale", [1.0, 3.0, 9.0])
def test_cfg_guider_is_bit_identical_to_pipeline_cfg(scheduler_cls, scale):
    pipe = tiny_demo_pipeline(scheduler_cls)
    own = sample(pipe, guidance_scale=scale)
    guided = sample(pipe, guider=ClassifierFreeGuidance(guidance_scale=scale))
    assert torch.equal(own, guided)


def test_cfg_guider_in_x0_space_matches_up_to_rounding(pipe, plain):
    x0_space = sample(pipe, output_type="latent", guider=ClassifierFreeGuidance(guidance_scale=CFG), guidance_space="x0")
    assert not torch.equal(x0_space, plain)  # a different float route ...
    torch.testing.assert_close(x0_space, plain, rtol=1e-4, atol=1e-4)  # ... to the same linear combination


def test_guider_outside_its_interval_is_the_conditional_prediction(pipe):
    never = ClassifierFreeGuidance(guidance_scale=CFG, start=0.0, stop=0.0)
    assert torch.equal(sample(pipe, guider=never), sample(pipe, guidance_scale=1.0))


def test_guidance_interval_skips_the_unconditional_pass(pipe, plain):
    batch_sizes = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    try:
        interval = sample(pipe, output_type="latent", steps=8, guider=ClassifierFreeGuidance(CFG, start=0.25, stop=0.75))
    finally:
        hook.remove()
    # 8 steps: CFG at steps 2..5 (6 samples in the batch), the conditional pass alone elsewhere (3 samples)
    assert batch_sizes == [3, 3, 6, 6, 6, 6, 3, 3]
    assert interval.shape == plain.shape


def test_stateful_guider_is_reset_between_runs(pipe):
    apg = AdaptiveProjectedGuidance(guidance_scale=CFG, adaptive_projected_guidance_momentum=-0.5)
    first, second = sample(pipe, guider=apg), sample(pipe, guider=apg)
    assert torch.equal(first, second)
    assert not torch.equal(first, sample(pipe, guider=AdaptiveProjectedGuidance(guidance_scale=CFG)))


def test_bad_guider_arguments(pipe):
    with pytest.raises(ValueError, match="inside the guider"):
        sample(pipe, guider=ClassifierFreeGuidance(CFG), guidance_scale=CFG)
    with pytest.raises(TypeError, match="diffusers.guiders protocol"):
        sample(pipe, guider=object())
    with pytest.raises(ValueError, match="guidance_space"):
        sample(pipe, guider=ClassifierFreeGuidance(CFG), guidance_space="eps")
    from diffusers.guiders import PerturbedAttentionGuidance

    with pytest.raises(ValueError, match="pred_cond_skip"):
        sample(pipe, guider=PerturbedAttentionGuidance(guidance_scale=CFG, perturbed_guidance_layers=[0]))


# ---------------------------------------------------------------------------------------------- every baseline

BASELINES = [
    "cfg-rescale", "interval", "apg", "cfg-zero-star", "fdg", "tcfg", "mimic-dt", "imagen-dt", "ref-clamp",
    "ref-aqclip", "cond-corridor", "cond-corridor-late", "qsilk", "qsilk-strong", "qsilk-clamp", "qsilk-hard", "qsilk-tile8", "qsilk-attention",
]  # fmt: skip


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_changes_the_images(pipe, plain, name):
    with get_method(name).sampling(pipe, CFG) as kwargs:
        out = sample(pipe, output_type="latent", **kwargs)
    assert out.shape == plain.shape and torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-3, name
    # the method is uninstalled afterwards: the pipeline samples exactly as before
    assert torch.equal(sample(pipe, output_type="latent", guidance_scale=CFG), plain)


@pytest.mark.parametrize("guider", ["cfg-rescale", "interval", "apg", "cfg-zero-star", "fdg", "tcfg", "mimic-dt"])
def test_qsilk_composes_with_each_guider(pipe, guider):
    with get_method(guider).sampling(pipe, CFG) as kwargs:
        alone = sample(pipe, output_type="latent", **kwargs)
    with get_method(f"{guider}+qsilk-strong").sampling(pipe, CFG) as kwargs:
        composed = sample(pipe, output_type="latent", **kwargs)
    assert torch.isfinite(composed).all()
    assert (composed - alone).abs().max() > 1e-4


def test_attention_confidence_composes_with_a_guidance_interval(pipe):
    """The attention probe reads the conditional half of a CFG batch, and the whole batch where the interval skips
    the unconditional pass: composed, it differs from QSilk with the structure proxy."""
    runs = {}
    for name in ("interval+qsilk", "interval+qsilk-attention"):
        with get_method(name).sampling(pipe, CFG) as kwargs:
            runs[name] = sample(pipe, output_type="latent", steps=8, **kwargs)
    assert torch.isfinite(runs["interval+qsilk-attention"]).all()
    assert not torch.equal(runs["interval+qsilk"], runs["interval+qsilk-attention"])


def test_cfg_guider_method_equals_baseline(pipe, plain):
    with get_method("cfg-guider").sampling(pipe, CFG) as kwargs:
        assert torch.equal(sample(pipe, output_type="latent", **kwargs), plain)
    with get_method("cfg+qsilk").sampling(pipe, CFG) as kwargs:
        via_name = sample(pipe, output_type="latent", **kwargs)
    with get_method("qsilk").sampling(pipe, CFG) as kwargs:
        assert torch.equal(sample(pipe, output_type="latent", **kwargs), via_name)


def test_method_records_are_json(pipe):
    import json

    for name in [*method_names(), "fdg+ref-clamp+qsilk"]:
        record = get_method(name).record(CFG)
        assert json.loads(json.dumps(record))["name"] == name
    assert get_method("fdg").record(9.0)["parts"][0]["params"]["guidance_scales"] == [9.0, 4.5]


def test_method_name_errors():
    with pytest.raises(ValueError, match="unknown method"):
        get_method("cfg-rescal")
    with pytest.raises(ValueError, match="at most one"):
        get_method("apg+fdg")
    with pytest.raises(ValueError, match="at most one"):
        get_method("qsilk+qsilk-strong")
    assert set(BASELINES) <= set(PARTS)


# ---------------------------------------------------------------------------------------------- thresholding


def _mimic_reference(cond, uncond, scale, mimic, percentile, phi):
    """Independent numpy version of the formula, loop per sample and channel."""
    cond, uncond = cond.double().numpy(), uncond.double().numpy()
    out = np.empty_like(cond)
    for b in range(cond.shape[0]):
        for c in range(cond.shape[1]):
            real = uncond[b, c] + scale * (cond[b, c] - uncond[b, c])
            mim = uncond[b, c] + mimic * (cond[b, c] - uncond[b, c])
            mean = real.mean()
            rc, mc = real - mean, mim - mim.mean()
            mim_max = np.abs(mc).max()
            limit = max(np.quantile(np.abs(rc), percentile), mim_max)
            out[b, c] = phi * (np.clip(rc, -limit, limit) / limit * mim_max) + (1 - phi) * rc + mean
    return torch.from_numpy(out)


@pytest.mark.parametrize("percentile,phi", [(1.0, 1.0), (0.9, 1.0), (0.995, 0.5)])
def test_mimic_scale_threshold_matches_independent_computation(percentile, phi):
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    out = mimic_scale_threshold(cond, uncond, 9.0, 3.0, percentile, phi)
    torch.testing.assert_close(out.double(), _mimic_reference(cond, uncond, 9.0, 3.0, percentile, phi), atol=1e-5, rtol=1e-5)


def test_mimic_scale_threshold_known_answers():
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    plain_cfg = uncond + 9.0 * (cond - uncond)
    # phi = 0, or a mimic scale equal to the real one with the max as threshold: plain CFG
    torch.testing.assert_close(mimic_scale_threshold(cond, uncond, 9.0, 3.0, 0.995, 0.0), plain_cfg)
    torch.testing.assert_close(mimic_scale_threshold(cond, uncond, 9.0, 9.0, 1.0, 1.0), plain_cfg)
    # percentile 1: per channel, the centred range is exactly the mimic prediction's
    out = mimic_scale_threshold(cond, uncond, 9.0, 3.0, 1.0, 1.0)
    mimic = uncond + 3.0 * (cond - uncond)
    centred = lambda x: x - x.mean((2, 3), keepdim=True)  # noqa: E731
    torch.testing.assert_close(centred(out).abs().amax((2, 3)), centred(mimic).abs().amax((2, 3)))
    torch.testing.assert_close(out.mean((2, 3)), plain_cfg.mean((2, 3)))
    with pytest.raises(ValueError, match="percentile"):
        mimic_scale_threshold(cond, uncond, 9.0, 3.0, 0.0)


def test_mimic_guider_at_cfg_1_is_conditional_only(pipe):
    assert torch.equal(sample(pipe, guider=MimicScaleGuidance(guidance_scale=1.0)), sample(pipe, guidance_scale=1.0))


def test_imagen_thresholding_uses_the_schedulers_own():
    dpm = DPMSolverMultistepScheduler(prediction_type="v_prediction")
    on = imagen_thresholding(dpm)
    assert on.config.thresholding and not dpm.config.thresholding
    sample_ = torch.randn(2, 4, 8, 8) * 5
    s = torch.quantile(sample_.abs().flatten(1), 0.995, dim=1).clamp_min(1)[:, None, None, None]
    torch.testing.assert_close(on._threshold_sample(sample_), sample_.clamp(-s, s) / s)
    with pytest.raises(ValueError, match="no Imagen thresholding"):
        imagen_thresholding(EulerDiscreteScheduler())


# ------------------------------------------------------------------------------- conditional corridor (qsilk.guidance)


def test_conditional_corridor_with_a_huge_k_is_plain_cfg_in_x0_space(pipe):
    from qsilk.guidance import ConditionalCorridorGuidance

    wide = sample(pipe, output_type="latent", guider=ConditionalCorridorGuidance(guidance_scale=CFG, k=1e6))
    x0_cfg = sample(pipe, output_type="latent", guider=ClassifierFreeGuidance(guidance_scale=CFG), guidance_space="x0")
    assert torch.equal(wide, x0_cfg)


def test_conditional_corridor_clips_the_guided_x0_into_the_conditional_spread():
    from qsilk.guidance import ConditionalCorridorGuidance
    from qsilk.ops import conditional_corridor

    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    guider = ConditionalCorridorGuidance(guidance_scale=CFG, k=1.0, tile=4, stride=2, softness=0.0)
    guider.set_state(step=0, num_inference_steps=4, timestep=999)
    out = guider.forward(cond, uncond)
    guided = uncond + CFG * (cond - uncond)
    centre, half = conditional_corridor(guided, cond, None, 4, 2, 1.0, 1.0)
    torch.testing.assert_close(out, guided.clamp(centre - half, centre + half))
    assert (out != guided).float().mean() > 0.1  # CFG 6 inflates the spread well beyond the conditional one
    # no unconditional prediction (CFG 1, outside an interval): nothing to tame, the prediction comes back as is
    plain_cond = ConditionalCorridorGuidance(guidance_scale=1.0, k=0.5)
    plain_cond.set_state(step=0, num_inference_steps=4, timestep=999)
    assert torch.equal(plain_cond.forward(cond, None), cond)
    # outside its window the corridor is off
    late = ConditionalCorridorGuidance(guidance_scale=CFG, k=1.0, window=(0.5, 1.0))
    late.set_state(step=1, num_inference_steps=4, timestep=500)
    torch.testing.assert_close(late.forward(cond, uncond), guided)
    late.set_state(step=2, num_inference_steps=4, timestep=250)
    assert not torch.allclose(late.forward(cond, uncond), guided)


def test_conditional_corridor_at_cfg_1_is_the_pipelines_cfg_1(pipe):
    from qsilk.guidance import ConditionalCorridorGuidance

    assert torch.equal(
        sample(pipe, guider=ConditionalCorridorGuidance(guidance_scale=1.0, k=0.5)), sample(pipe, guidance_scale=1.0)
    )


def test_conditional_corridor_composes_with_a_guider_and_rejects_bad_arguments(pipe):
    from qsilk.guidance import ConditionalCorridorGuidance

    with get_method("apg").sampling(pipe, CFG) as kwargs:
        alone = sample(pipe, output_type="latent", **kwargs)
    with get_method("apg+cond-corridor").sampling(pipe, CFG) as kwargs:
        assert isinstance(kwargs["guider"], ConditionalCorridorGuidance)
        assert isinstance(kwargs["guider"].guider, AdaptiveProjectedGuidance)
        composed = sample(pipe, output_type="latent", **kwargs)
    assert torch.isfinite(composed).all() and (composed - alone).abs().max() > 1e-3
    for bad in [{"k": 0}, {"softness": -1}, {"window": (0.5, 0.5)}, {"window": (-0.1, 1.0)}]:
        with pytest.raises(ValueError):
            ConditionalCorridorGuidance(guidance_scale=CFG, **bad)
    with pytest.raises(ValueError, match="guider or a guidance_scale"):
        ConditionalCorridorGuidance()
