"""The reference formulas' defects (qsilk-method.md section 2), each shown on the reference and absent from ours."""

import torch

from qsilk import aqclip, micro_clamp
from qsilk.eval.reference import reference_aqclip, reference_micro_clamp
from qsilk.ops import aqclip_corridor


def test_reference_clamp_equals_our_hard_mode():
    x = torch.randn(3, 4, 20, 24, generator=torch.Generator().manual_seed(0))
    assert torch.equal(reference_micro_clamp(x), micro_clamp(x, mode="hard"))


def test_defect_1_reference_corridor_is_not_monotone_ours_is():
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    n_tiles = 9  # tile 16, stride 8 on 32x32
    widths = []
    for h in (0.0, 0.5, 1.0):
        # The reference corridor width in units of sd: |Phi^-1(h^2/2)| + |Phi^-1(1 - (1-h)^2/2)|.
        normal = torch.distributions.Normal(0.0, 1.0)
        conf = torch.full((1, n_tiles), h)
        q_lo = (conf**2 / 2).clamp(1e-6, 0.5)
        q_hi = (1 - (1 - conf) ** 2 / 2).clamp(0.5, 1 - 1e-6)
        widths.append(float((normal.icdf(q_lo).abs() + normal.icdf(q_hi).abs()).mean()))
    assert widths[1] < widths[0] and widths[1] < widths[2]  # narrowest at mid confidence
    ours = [float(aqclip_corridor(x, torch.full((1, 1, 32, 32), c))[1].mean()) for c in (0.0, 0.5, 1.0)]
    assert ours[0] < ours[1] < ours[2]


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
