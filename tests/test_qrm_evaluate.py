"""QRM evaluation helpers: the bootstrapped Frechet distance equals the closed form on every resample; paired
bootstrap."""

from __future__ import annotations

import torch

from qsilk.eval.metrics import frechet_distance_gaussians
from qsilk.qrm.evaluate import frechet_stat, paired_bootstrap


def test_fast_frechet_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 40, generator=g, dtype=torch.float64) @ torch.randn(
        40, 40, generator=g, dtype=torch.float64
    )
    stat = frechet_stat("f", ref)
    for n in (25, 120):  # n < D and n > D
        features = {"f": torch.randn(n, 40, generator=g, dtype=torch.float64) * 1.3 + 0.2}
        for idx in (torch.arange(n), torch.randint(0, n, (n,), generator=g)):  # all samples, and a resample
            x = features["f"][idx]
            expected = frechet_distance_gaussians(ref.mean(0), torch.cov(ref.T), x.mean(0), torch.cov(x.T))
            assert abs(stat(features, idx) - expected) < 1e-6 * max(1.0, expected)


def test_paired_bootstrap_detects_a_shift_and_not_noise():
    g = torch.Generator().manual_seed(1)
    base = {"v": torch.randn(400, generator=g, dtype=torch.float64)}
    shifted = {"v": base["v"] + 0.3 + 0.05 * torch.randn(400, generator=g, dtype=torch.float64)}
    same = {"v": base["v"].clone()}
    stat = lambda f, i: float(f["v"][i].mean())  # noqa: E731
    r = paired_bootstrap(stat, base, shifted, 400, reps=300)
    assert r["excludes_zero"] and r["ci95"][0] > 0.25 and abs(r["diff"] - 0.3) < 0.02
    r0 = paired_bootstrap(stat, base, same, 400, reps=300)
    assert r0["diff"] == 0.0 and r0["ci95"] == [0.0, 0.0] and not r0["excludes_zero"]
