"""Detail-preserving QSilk variants (qsilk.ops.detail) and AQClip tiles that scale with the latent (issue 8 item 4)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qsilk import QSilkConfig
from qsilk.ops import (
    auto_tile,
    binomial_blur,
    edge_gate,
    highpass,
    resolve_tile,
    restore_high_frequencies,
    tile_starts,
)
from qsilk.stabilizer import QSilk

torch.set_num_threads(1)

AUTO = {"aqclip_tile": "auto", "aqclip_stride": "auto"}


def _latent(size: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    x[:, :, size // 3, size // 3] += 15.0  # an outlier, so the operators have something to do
    return x


def _checkerboard(size: int) -> torch.Tensor:
    idx = torch.arange(size)
    return ((idx[:, None] + idx[None, :]) % 2 * 2 - 1).float()


# -- ops import only torch ---------------------------------------------------------------------------------------------


def test_detail_module_imports_only_torch():
    source = Path(__file__).parents[1] / "src/qsilk/ops/detail.py"
    roots = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots <= {"torch", "__future__"}, roots


# -- binomial blur / highpass: parity and known answers ----------------------------------------------------------------


def test_binomial_blur_matches_conv2d_on_reflect_padded_input():
    x = torch.randn(3, 4, 9, 7, generator=torch.Generator().manual_seed(1))
    k1 = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (k1[:, None] * k1[None, :]).expand(4, 1, 3, 3)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=4)
    torch.testing.assert_close(binomial_blur(x), expected, rtol=1e-6, atol=1e-6)


def test_highpass_removes_constants_and_passes_the_nyquist_checkerboard():
    const = torch.full((1, 2, 8, 8), 3.25)
    assert highpass(const).abs().max() < 1e-6
    board = _checkerboard(8).expand(1, 2, 8, 8)
    torch.testing.assert_close(highpass(board), board, rtol=0, atol=1e-6)
    line = torch.randn(1, 1, 1, 6)  # an axis of length 1 is replicated, not reflected
    assert torch.isfinite(binomial_blur(line)).all()


# -- restore_high_frequencies ------------------------------------------------------------------------------------------


def test_restore_is_identity_when_off_or_nothing_changed():
    x = _latent(8)
    clipped = x.clamp(-2, 2)
    assert restore_high_frequencies(x, clipped, 0.0) is clipped
    assert restore_high_frequencies(x, x.clone(), 1.0).equal(x)


def test_restore_gives_back_a_removed_checkerboard_and_keeps_a_removed_offset():
    base = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    board = 0.7 * _checkerboard(8)
    # the clip removed pure Nyquist detail: strength 1 restores it entirely, strength 0.5 half of it
    torch.testing.assert_close(
        restore_high_frequencies(base + board, base, 1.0), base + board, rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        restore_high_frequencies(base + board, base, 0.5), base + board / 2, rtol=0, atol=1e-5
    )
    # the clip removed a constant offset (a range fix, no detail): nothing comes back
    torch.testing.assert_close(restore_high_frequencies(base + 2.0, base, 1.0), base, rtol=0, atol=1e-5)


def _top_band_power(x: torch.Tensor) -> torch.Tensor:
    """Power in |f| >= 0.25 cycles/px (circular FFT), per sample: an independent spectral measurement."""
    spec = torch.fft.fft2(x.double()).abs().pow(2)
    f = torch.fft.fftfreq(x.shape[-1])
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()
    return (spec * (radius >= 0.25)).sum(dim=(-3, -2, -1))


def test_restore_recovers_the_high_band_a_clip_removed():
    g = torch.Generator().manual_seed(3)
    smooth = F.interpolate(
        torch.randn(4, 1, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False
    )
    signal = smooth + 0.6 * torch.randn(4, 1, 32, 32, generator=g)  # smooth shapes plus fine detail
    clipped = signal.clamp(-0.5, 0.5)  # a hard corridor cuts peaks, and with them high-frequency energy
    restored = restore_high_frequencies(signal, clipped, 1.0)
    lost = _top_band_power(signal - clipped)
    left = _top_band_power(signal - restored)
    assert (left < 0.2 * lost).all(), left / lost
    # the high band's energy returns towards the original's (it was below it after the clip)
    hf_sig, hf_clip, hf_rest = (_top_band_power(t) for t in (signal, clipped, restored))
    assert (hf_clip < hf_sig).all()
    assert ((hf_rest - hf_sig).abs() < 0.5 * (hf_clip - hf_sig).abs()).all()
    # the clip's low-frequency correction stays: the restored signal's local mean follows the clipped one
    lp = binomial_blur(binomial_blur(restored - clipped))
    assert lp.abs().mean() < 0.2 * (signal - clipped).abs().mean()


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30, 3e38])
def test_restore_finite_in_finite_out_and_dtype(scale):
    x = _latent(8) / 16 * scale
    clipped = x.clamp(-0.1 * scale, 0.1 * scale)
    out = restore_high_frequencies(x, clipped, 1.0)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    half = (
        restore_high_frequencies(x.half().clamp(-60000, 60000), clipped.half(), 1.0) if scale == 1.0 else None
    )
    if half is not None:
        assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_restore_rejects_bad_input():
    x = _latent(8)
    with pytest.raises(ValueError, match="strength"):
        restore_high_frequencies(x, x, 1.5)
    with pytest.raises(ValueError, match="one shape"):
        restore_high_frequencies(x, x[:, :2], 1.0)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        restore_high_frequencies(bad, x, 1.0)


# -- edge_gate ---------------------------------------------------------------------------------------------------------


def test_edge_gate_known_answers():
    before = _latent(8)
    after = before.clamp(-1, 1)
    conf = torch.zeros(2, 1, 8, 8)
    conf[:, :, :, :3] = 1.0  # edges: keep the original
    conf[:, :, :, 3:5] = 0.7  # halfway between low 0.5 and high 0.9: the midpoint
    out = edge_gate(before, after, conf, 0.5, 0.9)
    assert out[..., :3].equal(before[..., :3])
    assert out[..., 5:].equal(after[..., 5:])  # ungated elements come back bit-identical
    torch.testing.assert_close(out[..., 3:5], (before[..., 3:5] + after[..., 3:5]) / 2, rtol=1e-6, atol=1e-6)
    # low == high: a step at low
    step = edge_gate(before, after, torch.full((1, 1, 8, 8), 0.6), 0.6, 0.6)
    assert step.equal(before)
    assert edge_gate(before, after, torch.full((1, 1, 8, 8), 0.59), 0.6, 0.6).equal(after)


def test_edge_gate_identity_when_nothing_changed_and_finite_out():
    x = _latent(8).half()
    assert edge_gate(x, x, torch.ones(2, 1, 8, 8)) is x
    big = _latent(8) * 1e37
    out = edge_gate(
        big, big.clamp(-1e37, 1e37), torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    )
    assert torch.isfinite(out).all()


def test_edge_gate_rejects_bad_input():
    x = _latent(8)
    with pytest.raises(ValueError, match="low"):
        edge_gate(x, x, torch.ones(2, 1, 8, 8), 0.9, 0.5)
    with pytest.raises(ValueError, match="confidence"):
        edge_gate(x, x, torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="does not match"):
        edge_gate(x, x, torch.ones(2, 1, 4, 4))


# -- auto tiles --------------------------------------------------------------------------------------------------------


def test_auto_tile_rule():
    assert auto_tile(64, 64) == (16, 8)  # SD 512 px: today's tile and stride
    assert auto_tile(128, 128) == (16, 8)  # SDXL 1024 px
    assert auto_tile(128, 96) == (16, 8)
    assert auto_tile(32, 32) == (8, 4)
    assert auto_tile(16, 16) == (4, 2)  # the demo latent
    assert auto_tile(3, 40) == (3, 1)  # never larger than the latent
    assert len(tile_starts(16, *auto_tile(16, 16))) == 7  # 7 x 7 tiles instead of one
    assert resolve_tile(8, "auto", 16, 16) == (8, 4)
    assert resolve_tile(12, 5, 16, 16) == (12, 5)
    with pytest.raises(ValueError, match="auto"):
        resolve_tile("auto", 4, 16, 16)


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize(
    "base",
    [
        QSilkConfig(),
        QSilkConfig.preset("strong"),
        QSilkConfig(clamp=False, aqclip_k_min=1.0, aqclip_k_max=2.0, ema=0.5),
    ],
)
def test_auto_tiles_are_bit_identical_to_todays_defaults_on_sd_sized_latents(size, base):
    x = _latent(size, seed=size)
    fixed, auto = QSilk(base), QSilk(base.replace(**AUTO))
    for step in range(3):
        y_fixed = fixed(x + 0.1 * step, step=step, num_steps=3)
        y_auto = auto(x + 0.1 * step, step=step, num_steps=3)
        assert y_auto.equal(y_fixed)
    assert fixed.last_stats["touched_fraction"] > 0  # QSilk did act: the identity is not vacuous
    if not base.clamp:
        assert fixed.last_stats["aqclip_fraction"] > 0


def test_auto_tiles_change_the_small_demo_latent():
    x = _latent(16, seed=5)
    cfg = QSilkConfig(clamp=False, aqclip_k_min=1.0, aqclip_k_max=1.5)
    y_fixed = QSilk(cfg)(x, step=0, num_steps=1)
    y_auto = QSilk(cfg.replace(**AUTO))(x, step=0, num_steps=1)
    y_explicit = QSilk(cfg.replace(aqclip_tile=4, aqclip_stride=2))(x, step=0, num_steps=1)
    assert y_auto.equal(y_explicit) and not y_auto.equal(y_fixed)


# -- config ------------------------------------------------------------------------------------------------------------


def test_config_round_trip_with_auto_and_detail_options():
    cfg = QSilkConfig(**AUTO, aqclip_edge_gate=True, aqclip_edge_range=(0.4, 0.8), hf_restore=0.5,
                      hf_restore_window=(0.5, 1.0))  # fmt: skip
    text = cfg.to_json()
    assert json.loads(text)["aqclip_tile"] == "auto"
    assert QSilkConfig.from_json(text) == cfg
    assert QSilkConfig(aqclip_tile=8, aqclip_stride="auto") == QSilkConfig.from_json(
        '{"aqclip_tile": 8, "aqclip_stride": "auto"}'
    )
    default = QSilkConfig()
    assert not default.aqclip_edge_gate and default.hf_restore == 0.0  # off by default
    assert default.aqclip_tile == 16 and default.aqclip_stride == 8  # defaults unchanged (see docs/study.md)


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"aqclip_tile": "auto", "aqclip_stride": 4}, "aqclip_stride"),
        ({"aqclip_tile": "Auto"}, "aqclip_tile"),
        ({"aqclip_stride": "half"}, "aqclip_stride"),
        ({"aqclip_tile": 0, "aqclip_stride": "auto"}, "aqclip_tile"),
        ({"aqclip_edge_gate": 1}, "aqclip_edge_gate"),
        ({"aqclip_edge_range": [0.9, 0.1]}, "aqclip_edge_range"),
        ({"aqclip_edge_range": 0.5}, "aqclip_edge_range"),
        ({"hf_restore": 1.5}, "hf_restore"),
        ({"hf_restore": "1"}, "hf_restore"),
        ({"hf_restore_window": [0.8, 0.2]}, "hf_restore_window"),
    ],
)
def test_config_rejects_bad_detail_values(bad, key):
    with pytest.raises(ValueError, match=key):
        QSilkConfig(**bad)
    with pytest.raises(ValueError, match=key):
        QSilkConfig.from_json(json.dumps(bad))


# -- through the stabilizer --------------------------------------------------------------------------------------------


def test_stabilizer_edge_gate_follows_the_confidence():
    x = _latent(16, seed=6)
    cfg = QSilkConfig(clamp=False, aqclip_k_min=0.5, aqclip_k_max=0.5, **AUTO)
    plain = QSilk(cfg)(x)
    assert not plain.equal(x)
    gated = cfg.replace(aqclip_edge_gate=True)
    # confidence 1 everywhere: every change is given back; 0 everywhere: the plain AQClip output, bit for bit
    assert QSilk(gated)(x, confidence=torch.ones(2, 1, 16, 16)).equal(x)
    assert QSilk(cfg.replace(aqclip_edge_gate=True))(x, confidence=torch.zeros(2, 1, 16, 16)).equal(
        QSilk(cfg)(x, confidence=torch.zeros(2, 1, 16, 16))
    )
    # structure confidence (default source): only part of the change survives
    out = QSilk(gated)(x)
    kept = (out - x).abs().sum() / (plain - x).abs().sum()
    assert 0 < kept < 1


def test_stabilizer_hf_restore_respects_its_window_and_is_off_by_default():
    x = _latent(16, seed=7)
    strong = QSilkConfig.preset("strong").replace(**AUTO)
    plain = [QSilk(strong)(x, step=s, num_steps=4) for s in range(4)]
    late = strong.replace(hf_restore=1.0, hf_restore_window=(0.5, 1.0))
    q = QSilk(late)
    outs = [q(x, step=s, num_steps=4) for s in range(4)]
    assert outs[0].equal(plain[0]) and outs[1].equal(plain[1])  # progress 0, 1/3: outside the window
    for s in (2, 3):
        assert not outs[s].equal(plain[s])
        assert torch.isfinite(outs[s]).all()
        # it gives back part of what QSilk removed, never more than all of it on average
        assert (outs[s] - x).abs().mean() < (plain[s] - x).abs().mean()
    # a partial window without a position: warned once, like the other windows
    with pytest.warns(RuntimeWarning, match="hf_restore_window"):
        QSilk(QSilkConfig(hf_restore=1.0, hf_restore_window=(0.5, 1.0)))(x)


def test_detail_preset_is_strong_with_auto_tiles_and_late_hf_restore():
    detail = QSilkConfig.preset("detail")
    assert detail == QSilkConfig.preset("strong").replace(
        **AUTO, hf_restore=1.0, hf_restore_window=(0.5, 1.0)
    )
    assert QSilkConfig.from_json(detail.to_json()) == detail
    # the study's method of that name runs exactly this config
    from qsilk.study.methods import get_method

    assert get_method("qsilk-strong-auto-hf").parts[0].build(9.0) == detail == get_method("qsilk-detail").parts[0].build(9.0)
