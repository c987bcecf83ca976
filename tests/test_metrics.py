"""qsilk.eval.metrics: known answers and parity with independent computations (numpy / scipy / torchmetrics)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qsilk.eval.metrics import (
    FAST_METRICS,
    ArtifactEnergy,
    FrechetMetric,
    Saturation,
    SpectralFidelity,
    artifact_score,
    compute_features,
    frechet_distance,
    frechet_distance_gaussians,
    kid_unbiased,
    make_metrics,
    radial_log_spectrum,
    score_all,
    spectral_score,
)

scipy_linalg = pytest.importorskip("scipy.linalg")


# ------------------------------------------------------------------------------------------------ images
def shapes(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Fashion-MNIST-like test images: dark background, a bright textured rectangle with sharp edges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    for i in range(n):
        top, left = torch.randint(4, size // 3, (2,), generator=g).tolist()
        h, w = torch.randint(size // 3, size // 2, (2,), generator=g).tolist()
        texture = 0.5 + 0.3 * torch.rand(h, w, generator=g)
        x[i, 0, top : top + h, left : left + w] = texture
    return x


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


# ------------------------------------------------------------------------------------------------ Frechet
def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_frechet_of_a_set_against_itself_is_zero():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(feats, feats)) < 1e-8
    assert frechet_distance(feats, feats + 0.5) == pytest.approx(12 * 0.25, rel=1e-6)  # mean shift only


def test_gaussian_closed_form_by_hand_and_against_scipy():
    # Diagonal covariances commute: W2^2 = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    by_hand = float((mu1 - mu2).pow(2).sum() + (s1.sqrt() - s2.sqrt()).pow(2).sum())
    assert frechet_distance_gaussians(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(by_hand, rel=1e-12)
    # General covariances: scipy's sqrtm route.
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    c1, c2 = a @ a.T + 0.1 * torch.eye(5), b @ b.T + 0.1 * torch.eye(5)
    m1, m2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    c1n, c2n = c1.numpy(), c2.numpy()
    expected = float(((m1 - m2) ** 2).sum()) + np.trace(c1n + c2n - 2 * scipy_linalg.sqrtm(c1n @ c2n).real)
    assert frechet_distance_gaussians(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)


def test_frechet_of_samples_from_two_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(2)
    d, n = 6, 40_000
    a, b = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.7, dtype=torch.float64)
    x1 = torch.randn(n, d, generator=g, dtype=torch.float64) @ a.T + mu1
    x2 = torch.randn(n, d, generator=g, dtype=torch.float64) @ b.T + mu2
    truth = frechet_distance_gaussians(mu1, a @ a.T, mu2, b @ b.T)
    sampled = frechet_distance(x1, x2)
    assert sampled == pytest.approx(truth, rel=0.03)
    # The two routes (eigenvalues of S1 S2 vs symmetric square roots) agree on the same moments, and with scipy.
    moments = frechet_distance_gaussians(x1.mean(0), torch.cov(x1.T), x2.mean(0), torch.cov(x2.T))
    assert sampled == pytest.approx(moments, rel=1e-8)
    assert sampled == pytest.approx(_scipy_frechet(x1[:2000].numpy(), x2[:2000].numpy()), rel=0.2)
    assert frechet_distance(x1[:2000], x2[:2000]) == pytest.approx(_scipy_frechet(x1[:2000].numpy(), x2[:2000].numpy()), rel=1e-7)


# ------------------------------------------------------------------------------------------------ KID
def test_kid_matches_torchmetrics_unbiased_mmd():
    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(3)
    real = torch.randn(40, 8, generator=g, dtype=torch.float64)
    fake = torch.randn(40, 8, generator=g, dtype=torch.float64) * 1.2 + 0.3
    assert kid_unbiased(real, fake) == pytest.approx(float(poly_mmd(real, fake)), rel=1e-10)


def test_kid_is_unbiased_on_equal_distributions():
    """Over many pairs of small sets from one distribution the mean KID is ~0 (the biased V-statistic, which
    keeps the diagonal, is clearly positive); a shifted distribution is clearly positive."""
    g = torch.Generator().manual_seed(4)
    d, n, trials = 4, 12, 400
    values, biased = [], []
    for _ in range(trials):
        a, b = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
        values.append(kid_unbiased(a, b))
        k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
        biased.append(float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()))
    values, biased = torch.tensor(values), torch.tensor(biased)
    stderr = float(values.std() / trials**0.5)
    assert abs(float(values.mean())) < 3 * stderr
    assert float(biased.mean()) > 10 * stderr
    shifted = kid_unbiased(torch.randn(200, d, generator=g), torch.randn(200, d, generator=g) + 1.0)
    assert shifted > 20 * stderr


def test_kid_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal D"):
        kid_unbiased(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        kid_unbiased(torch.randn(1, 3), torch.randn(5, 3))


# ------------------------------------------------------------------------------------------------ metric objects
class _Projection(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64 * 64, 8)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        return self.proj(images.mean(1).flatten(1))


def test_frechet_metric_update_compute_equals_score_of_features_and_reset_keeps_reference():
    metric = FrechetMetric(_Projection())
    real, fake = shapes(20, 0), shapes(20, 1) * 0.8
    with pytest.raises(ValueError, match="reference"):
        metric.update(fake)
        metric.compute()
    metric.reset()
    metric.update(real[:12], real=True)
    metric.update(real[12:], real=True)
    metric.update(fake[:7])
    metric.update(fake[7:])
    got = metric.compute()
    feats, ref = metric.features(fake), metric.features(real)
    assert feats.dtype == torch.float64 and feats.shape == (20, 8)
    expected = metric.score(feats, ref)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got["fd"] == pytest.approx(_scipy_frechet(ref.numpy(), feats.numpy()), rel=1e-6)
    metric.reset()
    metric.update(real)  # reference kept: the set against itself
    assert metric.compute()["fd"] == pytest.approx(0.0, abs=1e-8)
    metric.reset(reference=True)
    metric.set_reference_features(ref)
    metric.update(fake)
    assert metric.compute() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(2, 64, 64), "shape"),
        (torch.full((1, 1, 8, 8), 1.5), r"\[0, 1\]"),
        (torch.full((1, 1, 8, 8), float("nan")), "NaN"),
        (torch.rand(0, 1, 8, 8), "at least one"),
    ],
)
def test_bad_images_are_a_clear_error(bad, match):
    for metric in (SpectralFidelity(), Saturation(), ArtifactEnergy()):
        with pytest.raises(ValueError, match=match):
            metric.features(bad)


# ------------------------------------------------------------------------------------------------ spectral
def _numpy_radial_log_spectrum(img: np.ndarray) -> np.ndarray:
    """Independent: loops over rings, numpy FFT, explicit window."""
    h, w = img.shape
    x = img - img.mean()
    win = np.outer(np.hanning(h), np.hanning(w))
    x = x * win / np.sqrt((win**2).mean())
    p = np.abs(np.fft.fft2(x)) ** 2 / (h * w)
    n = min(h, w) // 2
    out = np.zeros(n)
    for k in range(n):
        vals = []
        for i in range(h):
            for j in range(w):
                fy = (i if i < (h + 1) // 2 else i - h) / h
                fx = (j if j < (w + 1) // 2 else j - w) / w
                if int(np.floor(np.hypot(fy, fx) * min(h, w) + 1e-9)) == k:
                    vals.append(p[i, j])
        out[k] = np.log10(np.mean(vals) + 1e-12)
    return out


def test_radial_spectrum_matches_an_independent_numpy_computation():
    img = shapes(1, 5, size=24)[0, 0].double()
    ours = radial_log_spectrum(img[None, None])[0].numpy()
    np.testing.assert_allclose(ours, _numpy_radial_log_spectrum(img.numpy()), rtol=1e-9, atol=1e-9)


def test_white_noise_has_a_flat_spectrum_at_its_variance():
    noise = torch.rand(64, 1, 64, 64, generator=torch.Generator().manual_seed(6))
    # E|FFT|^2 / N = variance = 1/12 for U(0, 1); the lowest rings sit lower (the removed mean, spread by the window).
    spec = radial_log_spectrum(noise).mean(0)[4:]
    np.testing.assert_allclose(spec.numpy(), np.log10(1 / 12), atol=0.05)


def test_spectral_fidelity_detects_blur_as_a_negative_hf_gap():
    metric = SpectralFidelity()
    real = shapes(16, 7)
    metric.update(real, real=True)
    metric.update(shapes(16, 8))  # same distribution
    same = metric.compute()
    metric.reset()
    metric.update(gaussian_blur(shapes(16, 8), 1.2))
    blurred = metric.compute()
    assert abs(same["spectral_hf_gap"]) < 0.15 and abs(same["spectral_mf_gap"]) < 0.15 and same["spectral_rms"] < 0.15
    assert blurred["spectral_hf_gap"] < -1.0
    assert blurred["spectral_hf_gap"] < blurred["spectral_mf_gap"] < -0.2  # blur removes more the higher it goes
    assert blurred["spectral_rms_hf"] > blurred["spectral_rms"] > 5 * same["spectral_rms"]
    # Sharpening (extra HF energy) reads the other way.
    sharpened = (real + 1.5 * (real - gaussian_blur(real, 1.0))).clamp(0, 1)
    assert spectral_score(metric.features(sharpened), metric.features(real))["spectral_hf_gap"] > 0.2


def test_spectral_score_needs_equal_sizes():
    with pytest.raises(ValueError, match="equal K"):
        spectral_score(torch.zeros(3, 32), torch.zeros(3, 16))


# ------------------------------------------------------------------------------------------------ saturation
def test_saturation_known_answer():
    x = torch.full((2, 3, 10, 10), 0.5)
    x[0, :, :2] = 0.0  # 20 % black
    x[0, :, 2:3] = 1.0  # 10 % white
    x[1, :, :5] = 1.0  # 50 % white
    metric = Saturation()
    feats = metric.features(x)
    np.testing.assert_allclose(feats[:, :2].numpy(), [[0.2, 0.1], [0.0, 0.5]])
    np.testing.assert_allclose(feats[:, 2].numpy(), [1.0, 1.0])
    metric.update(x)
    out = metric.compute()  # no reference needed
    assert out["saturation_low"] == pytest.approx(0.1) and out["saturation_high"] == pytest.approx(0.3)
    assert out["saturation"] == pytest.approx(0.4)
    metric.update(torch.full((1, 1, 10, 10), 0.25), real=True)
    assert metric.compute()["peak_delta"] == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------------ artifacts
def test_grid_at_the_stride_raises_harmonic_energy():
    clean = gaussian_blur(shapes(8, 9), 0.7)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    grid8 = (((yy % 8) == 0) | ((xx % 8) == 0)).float()  # a period-8 seam pattern, as patch/decoder seams
    gridded = (clean + 0.05 * grid8).clamp(0, 1)
    metric = ArtifactEnergy()
    f_clean, f_grid = metric.features(clean), metric.features(gridded)
    s_clean = metric.score(f_clean)
    s_grid = metric.score(f_grid, f_clean)
    # Axis-aligned shapes put a little more power on the axes, where part of the lattice lies: near 0, not 0.
    assert abs(s_clean["harmonic_s8"]) < 0.4
    assert s_grid["harmonic_s8_delta"] > 0.5
    assert s_grid["harmonic_s8_delta"] == pytest.approx(s_grid["harmonic_s8"] - s_clean["harmonic_s8"])
    # A period-3 grid is not on the stride-8 lattice: it does not read as a stride-8 artifact.
    off = (clean + 0.03 * ((xx % 3) == 0).float()).clamp(0, 1)
    assert metric.score(metric.features(off))["harmonic_s8"] < s_clean["harmonic_s8"] + 0.2


def test_ringing_beside_edges_raises_halo_and_clean_edges_have_none():
    clean = torch.zeros(4, 1, 64, 64)
    clean[:, :, 16:48, 16:48] = 0.7  # hard-edged squares: flat beside the edges
    ringing = clean.clone()
    for offset, amp in ((2, 0.12), (3, -0.08)):  # decaying oscillation outside and inside each vertical edge
        ringing[:, :, 16:48, 16 - offset] += amp
        ringing[:, :, 16:48, 47 + offset] += amp
        ringing[:, :, 16:48, 15 + offset] -= amp
        ringing[:, :, 16:48, 48 - offset] -= amp
    ringing = ringing.clamp(0, 1)
    metric = ArtifactEnergy()
    s_clean = metric.score(metric.features(clean))
    s_ring = metric.score(metric.features(ringing), metric.features(clean))
    assert s_clean["halo_rms"] == pytest.approx(0.0, abs=1e-12) and s_clean["edge_band_fraction"] > 0.05
    assert s_ring["halo_rms"] > 0.02 and s_ring["halo_rms_delta"] == pytest.approx(s_ring["halo_rms"])
    # Edge-free images have no band, and contribute nothing to the pooled RMS.
    flat = metric.features(torch.full((2, 1, 64, 64), 0.3))
    assert flat[:, -1].sum() == 0
    pooled = artifact_score(torch.cat([metric.features(ringing), flat]))
    assert pooled["halo_rms"] == pytest.approx(s_ring["halo_rms"])


# ------------------------------------------------------------------------------------------------ suite
def test_make_metrics_features_and_scores_compose():
    names = [n for n in FAST_METRICS if n != "fmnist"]
    metrics = make_metrics(names)
    gen, ref = shapes(6, 10).expand(-1, 3, -1, -1), shapes(6, 11)
    feats, ref_feats = compute_features(metrics, gen), compute_features(metrics, ref)
    scores = score_all(metrics, feats, ref_feats)
    for m in metrics.values():
        m.update(ref, real=True)
        m.update(gen)
        for key, value in m.compute().items():
            assert scores[key] == pytest.approx(value, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="unknown metrics"):
        make_metrics(["sharpness"])


# ------------------------------------------------------------------------------------------------ Inception
def _torchmetrics_fid_kid(network, real, fake):
    from torchmetrics.image.kid import KernelInceptionDistance

    from qsilk.eval.fid import make_fid

    fid = make_fid(network)
    # One subset of the whole set: torchmetrics' KID is then the all-pairs unbiased MMD^2, as ours.
    kid = KernelInceptionDistance(feature=network, normalize=True, subsets=1, subset_size=len(real))
    for m in (fid, kid):
        m.update(real, real=True)
        m.update(fake, real=False)
    return float(fid.compute()), float(kid.compute()[0])


def test_inception_metric_wiring_matches_torchmetrics_fast():
    from qsilk.eval.metrics import InceptionFID

    network = _Projection()
    network.num_features = 8
    real, fake = shapes(24, 12), gaussian_blur(shapes(24, 13), 1.0)
    metric = InceptionFID(network)
    metric.update(real, real=True)
    metric.update(fake)
    ours = metric.compute()
    fid, kid = _torchmetrics_fid_kid(network, real, fake)
    assert set(ours) == {"fid", "kid"}
    assert ours["fid"] == pytest.approx(fid, rel=1e-4)
    assert ours["kid"] == pytest.approx(kid, rel=1e-4, abs=1e-9)


@pytest.mark.slow
def test_inception_fid_self_zero_and_parity_with_torchmetrics():
    from qsilk.eval.fid import InceptionFeatures
    from qsilk.eval.metrics import InceptionFID

    network = InceptionFeatures()
    real, fake = shapes(16, 14), gaussian_blur(shapes(16, 15), 1.5)
    metric = InceptionFID(network)
    metric.update(real, real=True)
    metric.update(real)
    assert abs(metric.compute()["fid"]) < 1e-3
    metric.reset()
    metric.update(fake)
    ours = metric.compute()
    fid, kid = _torchmetrics_fid_kid(network, real, fake)
    assert ours["fid"] > 1.0
    assert ours["fid"] == pytest.approx(fid, rel=1e-3)
    assert ours["kid"] == pytest.approx(kid, rel=1e-3)


@pytest.mark.parametrize("n", [30, 300])  # fewer and more samples than dimensions
def test_frechet_to_cached_reference_stats_equals_the_direct_route(n):
    from qsilk.eval.metrics import ReferenceStats, frechet_distance_to

    g = torch.Generator().manual_seed(8)
    ref = torch.randn(500, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g, dtype=torch.float64)
    gen = torch.randn(n, 64, generator=g, dtype=torch.float64) * 1.5 + 0.3
    stats = ReferenceStats(ref)
    assert frechet_distance_to(stats, gen) == pytest.approx(frechet_distance(ref, gen), rel=1e-8)
    assert frechet_distance_to(stats, ref) == pytest.approx(0.0, abs=1e-6 * stats.trace)
    metric = FrechetMetric(_Projection())
    first = metric.score(gen, ref)
    cached = metric._stats[1]
    assert metric.score(gen[: n // 2], ref)["fd"] == pytest.approx(frechet_distance(ref, gen[: n // 2]), rel=1e-8)
    assert metric._stats[1] is cached and first["fd"] == pytest.approx(frechet_distance(ref, gen), rel=1e-8)


def test_orientation_table_runs_on_fake_data(monkeypatch, fake_dataset, capsys):
    """``python -m qsilk.eval.metrics`` (the table of docs/metrics.md) on the fake data set, 2 images per set."""
    import json

    from qsilk.eval.metrics.__main__ import main
    from qsilk.models.demo import data as demo_data
    from qsilk.models.demo import demo_weights_available

    if not demo_weights_available():
        pytest.skip("demo weights not present")
    monkeypatch.setattr(demo_data, "FASHION_MNIST_DIR", fake_dataset)
    main(["--n", "2", "--ref-n", "4", "--metrics", "spectral,saturation,artifacts"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["set"] for r in rows] == [
        "real train images", "autoencoder reconstructions", "4 steps, CFG 9", "16 steps, CFG 3"
    ]
    assert all(np.isfinite(r["spectral_hf_gap"]) and r["n"] == 2 for r in rows)
