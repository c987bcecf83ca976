"""QSilkConfig round-trips and validation; QSilk windows, EMA, statistics, no-op behaviour."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qsilk import QSilk, QSilkConfig, aqclip, micro_clamp, structure_confidence
from qsilk.stabilizer import schedule_progress


def spiky_latent(seed=0):
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(seed))
    x[0, 1, 5, 7] = 30.0
    x[1, 3, 20, 2] = -25.0
    return x


# -- config -----------------------------------------------------------------------------------------------------------


def test_config_json_round_trip(tmp_path):
    cfg = QSilkConfig(
        clamp_quantile=0.01, clamp_window=(0.1, 0.8), confidence=None, attention_layers=["a", "b"]
    )
    assert QSilkConfig.from_dict(cfg.to_dict()) == cfg
    assert QSilkConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    assert QSilkConfig.from_json(path) == cfg
    assert json.loads(path.read_text())["clamp_window"] == [0.1, 0.8]
    assert cfg.attention_layers == ("a", "b")


@given(
    quantile=st.floats(1e-6, 0.49),
    mode=st.sampled_from(["soft", "hard"]),
    tile=st.integers(1, 64),
    window=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
    confidence=st.sampled_from(["structure", "attention", None]),
)
def test_config_round_trip_property(quantile, mode, tile, window, confidence):
    cfg = QSilkConfig(
        clamp_quantile=quantile,
        clamp_mode=mode,
        aqclip_tile=tile,
        aqclip_stride=max(1, tile // 2),
        aqclip_window=tuple(window),
        confidence=confidence,
    )
    assert QSilkConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"clamp_quantile": 0.7}, "clamp_quantile"),
        ({"clamp_mode": "medium"}, "clamp_mode"),
        ({"aqclip_stride": 32}, "aqclip_stride"),
        ({"aqclip_window": (0.9, 0.1)}, "aqclip_window"),
        ({"aqclip_window": "early"}, "aqclip_window"),
        ({"confidence": "entropy"}, "confidence"),
        ({"ema": 1.0}, "ema"),
        ({"placement": "latent"}, "placement"),
        ({"nonsense": 1}, "unknown"),
        ({"clamp_quantile": "a lot"}, "clamp_quantile"),
    ],
)
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        QSilkConfig.from_dict(bad)


def test_config_from_json_errors(tmp_path):
    with pytest.raises(ValueError, match="malformed"):
        QSilkConfig.from_json("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        QSilkConfig.from_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="JSON object"):
        QSilkConfig.from_json("[1, 2]")


# -- stabilizer -------------------------------------------------------------------------------------------------------


def test_noop_returns_input_unchanged():
    x = spiky_latent()
    stab = QSilk(QSilkConfig.noop())
    assert stab(x) is x
    assert stab.last_stats["touched_fraction"] == 0.0
    assert not stab.is_active(0.5)


def test_default_equals_composition_of_the_operators():
    x = spiky_latent()
    cfg = QSilkConfig()
    expected = micro_clamp(x, cfg.clamp_quantile, "soft", softness=cfg.clamp_softness)
    expected = aqclip(expected, structure_confidence(expected), cfg.aqclip_tile, cfg.aqclip_stride)
    stab = QSilk(cfg)
    out = stab(x)
    assert torch.equal(out, expected)
    s = stab.last_stats
    assert s["clamp_active"] and s["aqclip_active"]
    assert s["max_abs_before"] == 30.0 and s["max_abs_after"] < 6.0
    assert 0 < s["clamp_fraction"] <= s["touched_fraction"] <= 1
    assert 0 <= s["confidence_mean"] <= 1
    json.dumps(s)


def test_windows_select_the_steps():
    x = spiky_latent()
    stab = QSilk(QSilkConfig(clamp_window=(0.0, 0.5), aqclip=False))
    assert stab(x, step=0, num_steps=5) is not x
    assert stab.last_stats["clamp_active"]
    assert stab(x, step=4, num_steps=5) is x
    assert not stab.last_stats["clamp_active"]
    assert stab(x, progress=0.5) is not x
    assert schedule_progress(2, 5, None) == 0.5 and schedule_progress(None, None, None) is None
    assert schedule_progress(0, 1, None) == 0.0


def test_caller_confidence_overrides_the_proxy():
    x = spiky_latent()
    stab = QSilk(QSilkConfig(clamp=False, aqclip_k_min=0.5, aqclip_k_max=4.0))
    low = stab(x, confidence=torch.zeros(2, 1, 8, 8))
    assert stab.last_stats["confidence_mean"] == 0.0
    high = stab(x, confidence=torch.ones(2, 1, 8, 8))
    assert stab.last_stats["confidence_mean"] == 1.0
    assert stab.last_stats["aqclip_fraction"] < (low != x).float().mean()
    assert (high != x).sum() < (low != x).sum()


def test_corridor_ema_blends_with_the_previous_step_and_reset_forgets():
    a, b = spiky_latent(1), spiky_latent(2) * 2
    plain = QSilk(QSilkConfig(clamp=False))
    smooth = QSilk(QSilkConfig(clamp=False, ema=0.5))
    assert torch.equal(smooth(a), plain(a))
    out_b = smooth(b)
    assert not torch.equal(out_b, plain(b))
    smooth.reset()
    assert torch.equal(smooth(b), plain(b))


def test_stabilizer_rejects_non_finite():
    x = spiky_latent()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        QSilk()(x)
