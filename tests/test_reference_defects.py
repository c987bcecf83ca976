"""The reference formulas' defects (qsilk-method.md section 2), each shown on the reference and absent from ours."""

import sys
from pathlib import Path

import pytest
import torch

import qsilk
from qsilk import QSilk, aqclip, micro_clamp
from qsilk.eval.reference import reference_aqclip, reference_micro_clamp
from qsilk.ops import aqclip_corridor


def test_reference_clamp_equals_our_hard_mode():  # parity, not a defect
    x = torch.randn(3, 4, 20, 24, generator=torch.Generator().manual_seed(0))
    assert torch.equal(reference_micro_clamp(x), micro_clamp(x, mode="hard"))


def _reference_corridor(confidence: float):
    """The corridor the reference actually applies, read off its output: one tile covering the whole latent, two
    far spikes that its tanh saturates to the corridor edges (out = mid +- half = hi, lo)."""
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    x[0, 0, 0, 0], x[0, 1, 5, 5] = 1e3, -1e3
    out = reference_aqclip(x, tile=32, stride=32, confidence=torch.full((1, 1), confidence))
    hi, lo = float(out[0, 0, 0, 0]), float(out[0, 1, 5, 5])
    return lo, hi, float(x.mean()), float(x.std(unbiased=False))


def test_defect_1_reference_corridor_is_not_monotone_ours_is():
    corridors = {h: _reference_corridor(h) for h in (0.0, 0.5, 1.0)}
    widths = {h: (hi - lo) / sd for h, (lo, hi, _, sd) in corridors.items()}
    assert widths[0.5] < 0.6 * widths[0.0] and widths[0.5] < 0.6 * widths[1.0]  # narrowest at mid confidence
    lo0, hi0, mean, sd = corridors[0.0]
    assert abs(hi0 - mean) < 1e-3 * sd  # one-sided at h = 0: nothing above the mean is allowed
    lo1, hi1, mean, sd = corridors[1.0]
    assert abs(lo1 - mean) < 1e-3 * sd  # ... and nothing below it at h = 1
    centres = {h: (lo + hi) / 2 - mean for h, (lo, hi, mean, _) in corridors.items()}
    assert centres[0.0] < -sd and centres[1.0] > sd  # the centre slides away from the tile mean
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = [aqclip_corridor(x, torch.full((1, 1, 32, 32), c)) for c in (0.0, 0.5, 1.0)]
    assert float(ours[0][1].mean()) < float(ours[1][1].mean()) < float(ours[2][1].mean())
    assert torch.equal(ours[0][0], ours[2][0])  # confidence never moves our centre


def test_defect_2_reference_amplifies_in_corridor_values_ours_leaves_them():
    # bounded texture (uniform noise: no outliers), as in a clean latent region
    x = 0.01 * (2 * torch.rand(1, 4, 32, 32, generator=torch.Generator().manual_seed(2)) - 1)
    ref = reference_aqclip(x, 16, 8, confidence=torch.full((1, 9), 0.5))
    centred_in, centred_ref = x - x.mean(), ref - x.mean()
    small = centred_in.abs() < 0.2 * float(x.std())
    gain = (centred_ref[small] / centred_in[small]).median()
    assert float(gain) > 1.5  # tanh with slope 2 at the centre is a contrast boost, not an identity
    assert torch.equal(aqclip(x), x)


def test_defect_3_reference_zeroes_uncovered_borders_ours_covers_everything():
    x = torch.randn(1, 4, 37, 45, generator=torch.Generator().manual_seed(3)) + 3.0
    ref = reference_aqclip(x, 16, 8)
    assert bool((ref[..., 32:, :] == 0).all()) and bool((ref[..., :, 40:] == 0).all())
    assert bool((aqclip(x) != 0).all())


def test_defect_4_reference_pools_channels_ours_keeps_them_apart():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 32, 32, generator=g)
    x[:, 0] *= 20  # a high-variance channel widens the pooled corridor of every channel
    x[0, 1, 10, 10] = 8.0  # an outlier in a unit-variance channel
    ref = reference_aqclip(x, 16, 8, confidence=torch.full((1, 9), 0.5))
    ours = aqclip(x, torch.zeros(1, 1, 32, 32))
    assert float(ours[0, 1, 10, 10]) < 5.0  # clipped against its own channel's spread
    assert float(ref[0, 1, 10, 10]) > 7.0  # the pooled corridor lets it through


# -- defects 5-7 concern the reference's attention hook and its exception handling: these tests check OUR behaviour
#    in the same situations (the reference code itself is not reproduced here). ------------------------------------


def _tiny_sd():
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_pipelines import tiny_sd_pipeline

    return tiny_sd_pipeline(scheduler="ddim")


def _run(pipe, **kwargs):
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_pipelines import run

    return run(pipe, 3, **kwargs)


def test_defect_5_ours_attention_confidence_is_per_layer_aspect_aware_and_on_the_conditional_half():
    """Reference: last attention call only, tokens reshaped to a square, CFG batch mismatch -> AQClip silently off.
    Ours: several layers, each on its true (h, w) grid, the conditional half of the CFG batch, and AQClip acts."""
    pytest.importorskip("diffusers")
    pipe = _tiny_sd()
    grids = []
    with qsilk.enable(pipe, confidence="attention", clamp=False, record_maps=True) as handle:
        probe, provider = handle.probe, handle.confidence_provider

        def spy(x0, step):  # what the probe captured in this step's forward, before it is consumed
            grids.append([record.grid_hw for record in probe.records.values()])
            return provider(x0, step)

        handle.confidence_provider = spy
        _run(pipe, height=32, width=64)  # a 16x32 latent, guidance batch of 2
    assert len(grids) == 3
    for step_grids in grids:
        assert len(step_grids) >= 2  # more than the last attention call
        assert (16, 32) in step_grids and all(w == 2 * h for h, w in step_grids)  # true 1:2 grids, not squares
    for entry, stats in zip(handle.maps, handle.stats, strict=True):
        assert entry["confidence"].shape == (1, 1, 16, 32)  # batch 1: the conditional half of the CFG batch of 2
        assert stats["aqclip_active"] and stats["aqclip_fraction"] > 0 and stats["confidence_mean"] is not None


def test_defect_6_ours_aqclip_runs_inside_the_pipeline_and_its_errors_surface():
    """Reference: the AQClip call raised a TypeError that a bare except swallowed, so AQClip never ran."""
    pytest.importorskip("diffusers")
    pipe = _tiny_sd()
    plain = _run(pipe)
    with qsilk.enable(pipe, clamp=False, aqclip_k_min=0.5, aqclip_k_max=1.0) as handle:  # AQClip alone
        out = _run(pipe)
    assert not torch.equal(out, plain)
    assert all(s["aqclip_active"] and s["aqclip_fraction"] > 0 for s in handle.stats)
    with qsilk.enable(pipe, clamp=False) as handle:
        handle.confidence_provider = lambda x0, step: torch.ones(3, 1, 4, 4)  # wrong batch size
        with pytest.raises(ValueError, match="confidence must be"):
            _run(pipe)


def test_defect_7_ours_never_returns_the_input_unchanged_on_an_exception():
    """Reference: any exception returned the input unchanged, silently. Ours: the exception reaches the caller."""
    pytest.importorskip("diffusers")
    pipe = _tiny_sd()

    def failing(x0, step):
        raise RuntimeError("probe exploded")

    with qsilk.enable(pipe) as handle:
        handle.confidence_provider = failing
        with pytest.raises(RuntimeError, match="probe exploded"):
            _run(pipe)
    x = torch.randn(1, 4, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        QSilk()(x)
