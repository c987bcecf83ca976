"""FID/KID wiring: our Inception preprocessing + torchmetrics, checked against an independent FID computation."""

import numpy as np
import pytest
import torch

from qsilk.eval.fid import InceptionFeatures, make_fid, make_kid

scipy_linalg = pytest.importorskip("scipy.linalg")


@pytest.fixture(scope="module")
def features():
    torch.manual_seed(0)
    return InceptionFeatures()


def _images(seed: int, n: int, bright: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 32, 32, generator=g) * 0.5 + bright
    return torch.nn.functional.interpolate(base, size=64, mode="bilinear").clamp(0, 1)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_feature_shape_grey_and_uint8_equivalence(features):
    x = _images(0, 3, 0.2)
    f_grey = features(x)
    assert f_grey.shape == (3, 2048)
    torch.testing.assert_close(features(x.expand(-1, 3, -1, -1)), f_grey)
    x_u8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(features(x_u8), features(x_u8.float() / 255))


def test_bad_shape_is_a_clear_error(features):
    with pytest.raises(ValueError, match="expected"):
        features(torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match="at least one image"):
        features(torch.rand(0, 1, 8, 8))


def test_micro_batches_give_the_same_features(features):
    x = _images(1, 5, 0.3)
    whole = features(x)
    features.batch_size = 2  # 2 + 2 + 1
    try:
        split = features(x)
    finally:
        features.batch_size = 32
    assert split.shape == (5, 2048)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4)


class _TinyFeatures(torch.nn.Module):
    """A fixed random projection: exercises the torchmetrics wiring without the (slow on CPU) Inception."""

    num_features = 16

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64 * 64, 16)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        return self.proj(images.float().mean(1).flatten(1)).double()


def test_fid_wiring_matches_independent_frechet_distance_fast():
    tiny = _TinyFeatures()
    real, fake = _images(1, 64, 0.1), _images(2, 64, 0.4)
    fid = make_fid(tiny)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    with torch.no_grad():
        expected = _frechet(tiny(real).numpy(), tiny(fake).numpy())
    assert float(fid.compute()) == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_fid_matches_independent_frechet_distance(features):
    real, fake = _images(1, 24, 0.1), _images(2, 24, 0.4)
    fid = make_fid(features)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    ours = float(fid.compute())
    expected = _frechet(features(real).numpy(), features(fake).numpy())
    assert ours > 1.0
    assert ours == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_fid_orders_distributions_and_kid_runs(features):
    real = _images(3, 24, 0.1)
    near, far = _images(4, 24, 0.12), _images(5, 24, 0.5)
    scores = []
    for fake in (near, far):
        fid = make_fid(features)
        fid.update(real, real=True)
        fid.update(fake, real=False)
        scores.append(float(fid.compute()))
    assert scores[0] < scores[1]
    kid = make_kid(features, subset_size=12)
    kid.update(real, real=True)
    kid.update(far, real=False)
    mean, std = kid.compute()
    assert float(mean) > 0 and float(std) >= 0


def test_frechet_distance_from_features_matches_scipy_and_torchmetrics():
    from qsilk.eval.features import frechet_distance, kernel_inception_distance

    g = torch.Generator().manual_seed(5)
    real = torch.randn(200, 16, generator=g, dtype=torch.float64)
    fake = torch.randn(150, 16, generator=g, dtype=torch.float64) * 1.3 + 0.2
    assert frechet_distance(real, fake) == pytest.approx(_frechet(real.numpy(), fake.numpy()), rel=1e-6)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    tiny = _TinyFeatures()
    a, b = _images(6, 64, 0.1), _images(7, 64, 0.3)
    fid = make_fid(tiny)
    fid.update(a, real=True)
    fid.update(b, real=False)
    with torch.no_grad():
        ours = frechet_distance(tiny(a), tiny(b))
    assert ours == pytest.approx(float(fid.compute()), rel=1e-4)
    kid_same, _ = kernel_inception_distance(real, real[torch.randperm(200, generator=g)], subsets=5, subset_size=100)
    kid_diff, _ = kernel_inception_distance(real, fake, subsets=5, subset_size=100)
    assert kid_diff > kid_same
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(real, fake[:, :8])


def test_cached_features_resume_after_interruption(tmp_path):
    from qsilk.eval.demo_fid import cached_features

    calls = []

    def images_for(start, count):
        calls.append((start, count))
        if len(calls) == 3 and not hasattr(images_for, "crashed"):
            images_for.crashed = True
            raise RuntimeError("simulated crash")
        return torch.full((count, 1, 4, 4), float(start))

    def feats(images):
        return images.flatten(1)[:, :2].double()

    with pytest.raises(RuntimeError):
        cached_features(tmp_path, 10, 4, images_for, feats, "t")
    assert calls == [(0, 4), (4, 4), (8, 2)]
    assert not list(tmp_path.glob(".*"))  # no half-written chunk left behind
    timing = {}
    out = cached_features(tmp_path, 10, 4, images_for, feats, "t", timing=timing)
    assert calls[3:] == [(8, 2)]  # only the missing chunk was recomputed
    assert out.shape == (10, 2) and out[:, 0].tolist() == [0.0] * 4 + [4.0] * 4 + [8.0] * 2
    # Compute time is summed across the two runs from what each chunk recorded, not the resumed run's wall time.
    from safetensors import safe_open

    recorded = 0.0
    for chunk in sorted(tmp_path.glob("*.safetensors")):
        with safe_open(str(chunk), framework="pt") as f:
            recorded += float(f.metadata()["seconds"])
    assert timing["chunks_cached"] == 2 and timing["chunks_computed"] == 1 and timing["chunks_untimed"] == 0
    assert timing["seconds"] == pytest.approx(recorded, abs=2e-3)
    assert 0 < timing["seconds_this_run"] <= timing["seconds"]


def test_demo_fid_table_end_to_end_and_resume(tmp_path, monkeypatch, fake_dataset, capsys):
    """The FID harness on the shipped demo model, a fake data set and tiny features: every cell (floors, QSilk off
    and on) lands in results.json and the table, and a re-run recomputes nothing."""
    import json

    import qsilk.eval.fid as fid_module
    from qsilk.eval import demo_fid
    from qsilk.models.demo import data as demo_data
    from qsilk.models.demo import demo_weights_available

    if not demo_weights_available():
        pytest.skip("demo weights not present")
    monkeypatch.setattr(demo_data, "FASHION_MNIST_DIR", fake_dataset)
    seen = []

    class CountingFeatures(_TinyFeatures):
        @torch.no_grad()
        def forward(self, images):
            seen.append(len(images))
            return super().forward(images)

    monkeypatch.setattr(fid_module, "InceptionFeatures", CountingFeatures)
    argv = ["--n", "12", "--ref-n", "16", "--steps", "2", "--cfg", "3", "--qsilk", "off", "default"]
    argv += ["--chunk", "6", "--floors", "--out", str(tmp_path)]
    demo_fid.main(argv)
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["qsilk"] for r in results.values()) == ["ae-train", "default", "off", "real-train"]
    assert all(r["n"] == 12 and r["ref_n"] == 16 and np.isfinite(r["fid"]) for r in results.values())
    assert results["steps=2 cfg=3 qsilk=default n=12"]["qsilk_config"]["clamp_quantile"] == 0.001
    # Real images of the same fake distribution sit closer to the reference than 2-step samples do.
    assert results["real-train n=12"]["fid"] < results["steps=2 cfg=3 qsilk=off n=12"]["fid"]
    table = capsys.readouterr().out
    assert "| real train images |" in table and "| autoencoder reconstructions |" in table
    assert table.count("| sampled (dpm) | 2 | 3 |") == 2
    computed = sum(seen)
    assert computed == 16 + 4 * 12
    first = {k: (r["seconds"], r["resumed"]) for k, r in results.items()}
    assert all(seconds > 0 and not resumed for seconds, resumed in first.values())
    demo_fid.main(argv)  # everything is cached: no image is featurised again
    assert sum(seen) == computed
    again = json.loads((tmp_path / "results.json").read_text())
    for key, (seconds, _) in first.items():  # a resumed cell keeps its real compute time and says it was resumed
        assert again[key]["resumed"] and again[key]["seconds"] == pytest.approx(seconds, abs=0.01)
    # The cache is keyed by contents: the same config file name with other values is computed afresh.
    config = tmp_path / "mine.json"
    config.write_text('{"clamp_quantile": 0.01}')
    cell = ["--n", "12", "--ref-n", "16", "--steps", "2", "--cfg", "3", "--chunk", "6", "--out", str(tmp_path)]
    demo_fid.main([*cell, "--qsilk", str(config)])
    before = sum(seen)
    config.write_text('{"clamp_quantile": 0.2, "aqclip_k_min": 0.5, "aqclip_k_max": 1.0}')
    demo_fid.main([*cell, "--qsilk", str(config)])
    assert sum(seen) == before + 12  # new features, not the stale ones of the old contents
    changed = json.loads((tmp_path / "results.json").read_text())["steps=2 cfg=3 qsilk=mine n=12"]
    assert changed["qsilk_config"]["clamp_quantile"] == 0.2 and not changed["resumed"]
    results = {k: v for k, v in json.loads((tmp_path / "results.json").read_text()).items() if "mine" not in k}
    (tmp_path / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    demo_fid.main(["--table", "--out", str(tmp_path)])
    assert capsys.readouterr().out.strip() == demo_fid.markdown_table(results)
    with pytest.raises(SystemExit, match="no results"):
        demo_fid.main(["--table", "--out", str(tmp_path / "nothing")])
