"""QSilkConfig round-trips and validation; QSilk windows, EMA, statistics, no-op behaviour."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qsilk import QSilk, QSilkConfig, aqclip, micro_clamp, structure_confidence
from qsilk.ops import apply_corridor, aqclip_corridor
from qsilk.stabilizer import StepStats, schedule_progress

ROOT = Path(__file__).resolve().parents[1]


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
    smooth = QSilk(QSilkConfig(clamp=False, ema=0.25))
    assert torch.equal(smooth(a), plain(a))
    out_b = smooth(b)
    # the blend, computed from the operators: corridor = 0.25 * previous + 0.75 * current, then the soft clip
    centre_a, half_a = aqclip_corridor(a, structure_confidence(a))
    centre_b, half_b = aqclip_corridor(b, structure_confidence(b))
    expected = apply_corridor(b, 0.25 * centre_a + 0.75 * centre_b, 0.25 * half_a + 0.75 * half_b, 0.25)
    assert torch.equal(out_b, expected)
    assert not torch.equal(out_b, plain(b))
    smooth.reset()
    assert torch.equal(smooth(b), plain(b))


def test_stabilizer_rejects_non_finite():
    x = spiky_latent()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        QSilk()(x)


# -- config validation (issue 7, item 6) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"clamp": "false"}, "clamp"),  # a truthy string ran with clamping on
        ({"aqclip": 0}, "aqclip"),
        ({"clamp_per_channel": None}, "clamp_per_channel"),
        ({"aqclip_tile": 16.0}, "aqclip_tile"),  # integral floats too: one rule, no history-dependent cache hits
        ({"aqclip_stride": 8.5}, "aqclip_stride"),
        ({"aqclip_tile": True}, "aqclip_tile"),
        ({"attention_max_queries": "256"}, "attention_max_queries"),
        ({"aqclip_k_max": float("inf")}, "aqclip_k_max"),  # Infinity turned AQClip silently off
        ({"aqclip_k_min": float("nan")}, "aqclip_k_min"),
        ({"clamp_softness": True}, "clamp_softness"),
        ({"ema": "0.5"}, "ema"),
        ({"clamp_window": [0.0, float("nan")]}, "clamp_window"),
        ({"clamp_window": [0.0, 0.5, 1.0]}, "clamp_window"),
        ({"aqclip_window": [0, "1"]}, "aqclip_window"),
        ({"attention_layers": [1, 2]}, "attention_layers"),
        ({"attention_layers": "down.0"}, "attention_layers"),
        ({"clamp_mode": ["soft"]}, "clamp_mode"),
    ],
)
def test_config_validates_types_from_python_and_json_alike(bad, key):
    with pytest.raises(ValueError, match=key):
        QSilkConfig(**bad)
    with pytest.raises(ValueError, match=key):
        QSilkConfig.from_dict(bad)
    text = json.dumps(bad)  # Python's json writes NaN / Infinity, which json.loads reads back
    with pytest.raises(ValueError, match=key):
        QSilkConfig.from_json(text)
    with pytest.raises(ValueError, match=key):
        QSilkConfig().replace(**bad)


def test_config_json_nan_and_infinity_literals_are_rejected():
    for literal in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ValueError, match="aqclip_k_max must be finite"):
            QSilkConfig.from_json('{"aqclip_k_max": ' + literal + '}')


def test_config_accepts_ints_for_floats_and_keeps_types():
    cfg = QSilkConfig.from_json('{"aqclip_k_min": 1, "aqclip_k_max": 3, "clamp_window": [0, 1], "aqclip_tile": 8}')
    assert isinstance(cfg.aqclip_k_min, float) and cfg.aqclip_k_max == 3.0
    assert cfg.clamp_window == (0.0, 1.0) and isinstance(cfg.aqclip_tile, int)
    assert QSilkConfig.from_json(cfg.to_json()) == cfg


# -- presets (item 16) ------------------------------------------------------------------------------------------------


def test_presets_ship_in_the_package():
    assert QSilkConfig.preset_names()[:2] == ("default", "strong")
    assert QSilkConfig.preset("default") == QSilkConfig()
    strong = QSilkConfig.preset("strong")
    assert strong != QSilkConfig() and strong.clamp_quantile > QSilkConfig().clamp_quantile
    assert strong.aqclip_k_max < QSilkConfig().aqclip_k_max
    for name in QSilkConfig.preset_names():
        assert QSilkConfig.from_json(QSilkConfig.preset(name).to_json()) == QSilkConfig.preset(name)
    with pytest.raises(ValueError, match="unknown QSilk preset 'loud'.*default, strong"):
        QSilkConfig.preset("loud")


def test_the_strong_config_file_equals_the_strong_preset():
    assert QSilkConfig.from_json(ROOT / "configs" / "qsilk-strong.json") == QSilkConfig.preset("strong")


# -- the call signature (item 15) -------------------------------------------------------------------------------------


def test_positions_are_keyword_only_and_sigma_is_gone():
    x = spiky_latent()
    stab = QSilk()
    with pytest.raises(TypeError):
        stab(x, 0, 10)  # used to read as sigma=0, step=10
    with pytest.raises(TypeError):
        stab(x, sigma=1.0)
    with pytest.raises(ValueError, match="progress"):
        stab(x, progress=1.5)
    with pytest.raises(ValueError, match="progress"):
        stab(x, step=7, num_steps=5)


def test_partial_window_without_a_position_warns_once():
    x = spiky_latent()
    full = QSilk()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full(x)  # full windows: nothing to say
        QSilk(QSilkConfig(clamp=False, clamp_window=(0.0, 0.5)))(x)  # the windowed operator is off
    stab = QSilk(QSilkConfig(aqclip_window=(0.0, 0.5)))
    with pytest.warns(RuntimeWarning, match="aqclip_window cannot be applied"):
        out = stab(x)
    assert stab.last_stats["aqclip_active"] and not torch.equal(out, x)  # documented: every operator runs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stab(x)  # once
        stab(x, progress=0.9)  # a position: the window applies
    assert not stab.last_stats["aqclip_active"]


# -- statistics on the device (item 17) -------------------------------------------------------------------------------


def test_stats_are_lazy_and_equal_an_independent_count():
    x = spiky_latent()
    cfg = QSilkConfig()
    stab = QSilk(cfg)
    out = stab(x)
    pending = stab.last_step_stats
    assert isinstance(pending, StepStats) and pending._dict is None  # nothing read back yet
    clamped = micro_clamp(x, cfg.clamp_quantile, "soft", softness=cfg.clamp_softness)
    n = x.numel()
    expected = {
        "clamp_fraction": int((clamped != x).sum()) / n,
        "aqclip_fraction": int((out != clamped).sum()) / n,
        "touched_fraction": int((out != x).sum()) / n,
        "max_abs_before": float(x.abs().max()),
        "max_abs_after": float(out.abs().max()),
        "clamp_active": True,
        "aqclip_active": True,
        "confidence_mean": float(structure_confidence(clamped).mean()),
    }
    assert stab.last_stats == expected
    assert StepStats.to_dicts([pending, pending]) == [expected, expected]
    quiet = QSilk(cfg, collect_stats=False)
    assert torch.equal(quiet(x), out) and quiet.last_stats == {} and quiet.last_step_stats is None
    stab(x, progress=0.5)
    stab.reset()
    assert stab.last_stats == {}


def test_inactive_call_does_not_inspect_the_input():
    stab = QSilk(QSilkConfig(clamp_window=(0.5, 1.0), aqclip_window=(0.5, 1.0)))
    x = spiky_latent()
    x[0, 0, 0, 0] = float("nan")  # an inactive QSilk must behave as an absent one
    assert stab(x, progress=0.1) is x
    assert not stab.last_stats["clamp_active"] and stab.last_stats["touched_fraction"] == 0.0
