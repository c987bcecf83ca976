"""QSilk operators: exactness against torch.quantile, identity inside corridors, coverage, monotonicity."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qsilk import QSilk, aqclip, micro_clamp, structure_confidence
from qsilk.ops import aqclip_corridor, conditional_corridor, soft_clip, tail_quantiles, tile_starts
from qsilk.ops.quantile import upper_quantile

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def gaussian(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def with_spikes(x, count=20, size=40.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = x.clone()
    flat = out.view(out.shape[0], -1)
    idx = torch.randint(0, flat.shape[1], (flat.shape[0], count), generator=g)
    signs = torch.where(torch.rand(flat.shape[0], count, generator=g) < 0.5, -1.0, 1.0)
    flat.scatter_(1, idx, size * signs)
    return out, idx


# -- tail quantiles ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 17, 1000, 4 * 84 * 118])
@pytest.mark.parametrize("q", [0.001, 0.01, 0.2, 0.5])
def test_tail_quantiles_match_torch_quantile_exactly(n, q):
    rows = gaussian(3, n, seed=n)
    lo, hi = tail_quantiles(rows, q)
    ref = torch.quantile(rows, torch.tensor([q, 1 - q]), dim=1)
    assert torch.equal(lo.squeeze(1), ref[0])
    assert torch.equal(hi.squeeze(1), ref[1])


@pytest.mark.parametrize("n", [2, 3, 17, 1000, 4096])
@pytest.mark.parametrize("q", [0.001, 0.05, 0.2, 0.5])
def test_upper_quantile_matches_torch_quantile_exactly(n, q):
    rows = gaussian(3, n, seed=n + 1)
    assert torch.equal(upper_quantile(rows, q).squeeze(1), torch.quantile(rows, 1 - q, dim=1))


def test_tail_quantiles_above_torch_quantile_limit():
    # torch.quantile refuses > 16M elements; ours does not. Check against an explicit sort.
    rows = gaussian(1, 17_000_000, seed=3)
    lo, hi = tail_quantiles(rows, 0.001)
    ordered = rows.sort(dim=1).values[0]
    n = rows.shape[1]
    pos = 0.001 * (n - 1)
    expect_lo = ordered[math.floor(pos)] + (pos - math.floor(pos)) * (
        ordered[math.ceil(pos)] - ordered[math.floor(pos)]
    )
    assert torch.allclose(lo[0, 0], expect_lo, atol=1e-6)
    assert hi[0, 0] > lo[0, 0]


def test_tail_quantiles_rejects_bad_q():
    with pytest.raises(ValueError, match="quantile"):
        tail_quantiles(torch.zeros(1, 5), 0.7)


# -- soft clip --------------------------------------------------------------------------------------------------------


def test_soft_clip_is_continuous_with_unit_slope_and_bounded():
    lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
    x = torch.linspace(-5, 5, 10001, dtype=torch.float64).float()
    y = soft_clip(x, lo, hi, 0.25)
    assert float(y.max()) <= 1.25 and float(y.min()) >= -1.25
    dy = (y[1:] - y[:-1]) / (x[1:] - x[:-1])
    assert float(dy.max()) <= 1.0 + 1e-3  # never amplifies (the reference's tanh with slope 2 did)
    assert float((y[1:] - y[:-1]).min()) >= 0  # monotone
    edge = (x - 1).abs().argmin()
    assert abs(float(dy[edge]) - 1.0) < 1e-2  # slope continuous at the corridor edge
    inside = (x >= -1) & (x <= 1)
    assert torch.equal(y[inside], x[inside])


# -- micro-clamp ------------------------------------------------------------------------------------------------------


def test_micro_clamp_soft_leaves_corridor_values_bit_identical():
    x = gaussian(2, 4, 32, 32)
    y = micro_clamp(x, 0.01)
    flat = x.reshape(2, -1)
    ref = torch.quantile(flat, torch.tensor([0.01, 0.99]), dim=1)
    inside = (flat >= ref[0][:, None]) & (flat <= ref[1][:, None])
    assert torch.equal(y.reshape(2, -1)[inside], flat[inside])
    out_y, out_x = y.reshape(2, -1)[~inside], flat[~inside]
    assert bool((out_y.abs() <= out_x.abs()).all())  # pulled towards the corridor, never pushed out
    far = (out_x.abs() - out_y.abs()) > 0.0
    assert float(far.float().mean()) > 0.9


def test_micro_clamp_hard_equals_reference_clamp():
    x = gaussian(3, 4, 24, 40)
    flat = x.reshape(3, -1)
    ref = torch.quantile(flat, torch.tensor([0.001, 0.999]), dim=1)
    expected = flat.clamp(ref[0][:, None], ref[1][:, None]).reshape_as(x)
    assert torch.equal(micro_clamp(x, 0.001, mode="hard"), expected)


def test_micro_clamp_per_channel_uses_each_channel_corridor():
    x = gaussian(1, 3, 16, 16) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1)
    y = micro_clamp(x, 0.05, mode="hard", per_channel=True)
    for c in range(3):
        ref = torch.quantile(x[0, c].flatten(), torch.tensor([0.05, 0.95]))
        assert torch.equal(y[0, c], x[0, c].clamp(ref[0], ref[1]))


def test_spikes_come_out_bounded_and_the_rest_unchanged():
    x = gaussian(2, 4, 64, 64)
    spiky, _ = with_spikes(x)
    y = micro_clamp(spiky)
    flat = spiky.reshape(2, -1)
    lo, hi = torch.quantile(flat, torch.tensor([0.001, 0.999]), dim=1)
    margin = 0.25 * (hi - lo) / 2
    assert bool((y.reshape(2, -1) <= (hi + margin)[:, None] + 1e-6).all())
    assert float(y.abs().max()) < 6.0  # spikes of 40 are gone
    untouched = (flat >= lo[:, None]) & (flat <= hi[:, None])
    assert untouched.float().mean() > 0.99
    assert torch.equal(y.reshape(2, -1)[untouched], flat[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_preserved(dtype):
    x = gaussian(2, 4, 20, 28, dtype=dtype)
    for out in (micro_clamp(x), aqclip(x), aqclip(micro_clamp(x), structure_confidence(x))):
        assert out.dtype == dtype and out.shape == x.shape
    assert structure_confidence(x).dtype == torch.float32


def test_non_finite_input_is_rejected_with_a_clear_error():
    x = gaussian(1, 4, 16, 16)
    x[0, 0, 3, 3] = float("nan")
    for op in (micro_clamp, aqclip, structure_confidence):
        with pytest.raises(ValueError, match="non-finite"):
            op(x)
    x[0, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        micro_clamp(x)


def test_bad_arguments():
    x = gaussian(1, 4, 16, 16)
    with pytest.raises(ValueError, match="mode"):
        micro_clamp(x, mode="medium")
    with pytest.raises(ValueError, match="stride"):
        aqclip(x, tile=4, stride=8)
    with pytest.raises(ValueError, match="k_min"):
        aqclip(x, k_min=3, k_max=2)
    with pytest.raises(ValueError, match="confidence"):
        aqclip(x, confidence=torch.ones(3, 1, 4, 4))
    with pytest.raises(TypeError):
        micro_clamp(torch.ones(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("op", ["clamp", "aqclip", "confidence"])
def test_batch_independence(op):
    x = gaussian(5, 4, 24, 36)
    x, _ = with_spikes(x, count=8, size=12.0)
    fn = {
        "clamp": micro_clamp,
        "aqclip": lambda t: aqclip(t, structure_confidence(t)),
        "confidence": structure_confidence,
    }[op]
    batched = fn(x)
    for i in range(x.shape[0]):
        assert torch.equal(batched[i : i + 1], fn(x[i : i + 1].clone()))


# -- AQClip -----------------------------------------------------------------------------------------------------------


def test_constant_input_passes_through_unchanged():
    for value in (0.0, 3.3, -1e4):
        x = torch.full((2, 4, 20, 30), value)
        assert torch.equal(aqclip(x), x)
        assert torch.equal(aqclip(x, confidence=torch.zeros(2, 1, 20, 30)), x)


@pytest.mark.parametrize("shape", [(1, 4, 84, 118), (1, 16, 13, 77), (1, 4, 16, 16)])
def test_smooth_ramp_passes_through_unchanged(shape):
    _, c, h, w = shape
    i = torch.arange(h, dtype=torch.float32)[:, None]
    j = torch.arange(w, dtype=torch.float32)[None, :]
    slopes = torch.linspace(-0.2, 0.3, c)
    ramp = torch.stack([s * i + 0.07 * j + k for k, s in enumerate(slopes)]).unsqueeze(0)
    assert torch.equal(aqclip(ramp), ramp)
    assert torch.equal(aqclip(ramp, confidence=torch.zeros(1, 1, h, w)), ramp)  # narrowest corridor too


@pytest.mark.parametrize("shape", [(1, 4, 84, 118), (2, 16, 13, 77), (1, 4, 5, 3)])
def test_odd_sizes_cover_every_element_and_keep_borders(shape):
    _, _, h, w = shape
    for size in (h, w):
        starts = tile_starts(size, 16, 8)
        covered = torch.zeros(size, dtype=torch.bool)
        for s in starts:
            covered[s : s + min(16, size)] = True
        assert bool(covered.all())
    x = gaussian(*shape, seed=4) + 5.0  # non-zero everywhere: a zeroed border would show
    centre, half = aqclip_corridor(x)
    assert bool(torch.isfinite(centre).all()) and bool((half > 0).all())
    y = aqclip(x)
    assert bool((y != 0).all())
    # every element sees its own neighbourhood: a spike in any corner is clipped
    spiky = x.clone()
    for r, col in [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]:
        spiky[0, 0, r, col] = 1e3
    if h * w >= 64:
        out = aqclip(spiky)
        for r, col in [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]:
            assert float(out[0, 0, r, col]) < 500


def test_corridor_is_monotone_in_confidence_and_centred():
    x = gaussian(1, 4, 32, 48, seed=5)
    halves = [aqclip_corridor(x, torch.full((1, 1, 32, 48), c))[1] for c in (0.0, 0.25, 0.5, 0.75, 1.0)]
    for narrow, wide in zip(halves[:-1], halves[1:], strict=True):
        assert bool((wide > narrow).all())
    centres = [aqclip_corridor(x, torch.full((1, 1, 32, 48), c))[0] for c in (0.0, 1.0)]
    assert torch.equal(centres[0], centres[1])  # confidence widens; it never moves the centre
    # the corridor follows the local statistic: a channel scaled by 10 gets a 10x wider corridor
    scaled = x.clone()
    scaled[:, 1] *= 10
    h_ref, h_scaled = aqclip_corridor(x)[1], aqclip_corridor(scaled)[1]
    assert torch.allclose(h_scaled[:, 1], 10 * h_ref[:, 1], rtol=1e-4)
    assert torch.allclose(h_scaled[:, 0], h_ref[:, 0])


def test_local_spike_is_clipped_more_where_confidence_is_low():
    x = gaussian(1, 4, 32, 32, seed=6)
    x[0, 2, 8, 8] = 6.0
    x[0, 2, 24, 24] = 6.0
    conf = torch.zeros(1, 1, 32, 32)
    conf[..., 16:, 16:] = 1.0
    y = aqclip(x, conf)
    assert float(y[0, 2, 8, 8]) < float(y[0, 2, 24, 24]) <= 6.0


def explicit_tile_fields(x, tile, stride):
    """Independent computation: loop over tiles, per-channel mean/std, Hann-blend by hand (sample 0, float64)."""
    _, channels, height, width = x.shape
    num = torch.zeros(channels, height, width, dtype=torch.float64)
    num_sd = torch.zeros_like(num)
    den = torch.zeros(height, width, dtype=torch.float64)
    win = torch.sin(math.pi * (torch.arange(tile, dtype=torch.float64) + 0.5) / tile) ** 2
    w2 = win[:, None] * win[None, :]
    for r in tile_starts(height, tile, stride):
        for c in tile_starts(width, tile, stride):
            patch = x[0, :, r : r + tile, c : c + tile].double()
            mean = patch.mean(dim=(1, 2))
            sd = patch.var(dim=(1, 2), unbiased=False).sqrt()
            num[:, r : r + tile, c : c + tile] += w2 * mean[:, None, None]
            num_sd[:, r : r + tile, c : c + tile] += w2 * sd[:, None, None]
            den[r : r + tile, c : c + tile] += w2
    return num / den, num_sd / den


def test_aqclip_tile_statistics_match_an_explicit_per_tile_loop():
    x = gaussian(1, 2, 21, 19, seed=7)
    centre, half = aqclip_corridor(x, None, 8, 4, k_min=2.0, k_max=2.0)
    mean, sd = explicit_tile_fields(x, 8, 4)
    assert torch.allclose(centre[0].double(), mean, atol=1e-5)
    assert torch.allclose(half[0].double(), 2.0 * sd, atol=1e-4)


def test_conditional_corridor_centres_on_the_guided_x0_and_takes_the_conditional_spread():
    guided = 3.0 * gaussian(1, 2, 21, 19, seed=7) + 0.5
    cond = gaussian(1, 2, 21, 19, seed=8)
    centre, half = conditional_corridor(guided, cond, None, 8, 4, k_min=1.5, k_max=1.5)
    mean, _ = explicit_tile_fields(guided, 8, 4)
    _, sd = explicit_tile_fields(cond, 8, 4)
    assert torch.allclose(centre[0].double(), mean, atol=1e-5)
    # (+ the relative floor, 1e-4 x mean |x0| ~ 2.6e-4 here; the guided x0's own std is 3x the conditional one)
    assert torch.allclose(half[0].double(), 1.5 * sd, atol=1e-3)
    # with the guided x0 as its own condition it is AQClip's corridor exactly
    for a, b in zip(conditional_corridor(guided, guided, None, 8, 4), aqclip_corridor(guided, None, 8, 4), strict=True):
        assert torch.equal(a, b)


def test_conditional_corridor_rejects_mismatched_or_non_finite_conditions():
    x = gaussian(2, 4, 16, 16)
    with pytest.raises(ValueError, match="x0_cond must have"):
        conditional_corridor(x, x[:1])
    with pytest.raises(ValueError, match="non-finite"):
        conditional_corridor(x, torch.full_like(x, float("nan")))


# -- structure confidence ---------------------------------------------------------------------------------------------


def test_structure_confidence_is_high_on_edges_and_low_on_flat_regions():
    x = torch.zeros(1, 4, 32, 32)
    x[..., 16:] = 1.0  # a vertical edge
    x = x + 0.001 * gaussian(1, 4, 32, 32)
    conf = structure_confidence(x)
    assert conf.shape == (1, 1, 32, 32)
    assert float(conf.min()) >= 0 and float(conf.max()) <= 1
    assert float(conf[..., 15:17].mean()) > 0.9
    assert float(conf[..., :8].mean()) < 0.05
    assert torch.equal(structure_confidence(torch.ones(1, 4, 8, 8)), torch.zeros(1, 1, 8, 8))


# -- property-based ---------------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 40), st.integers(1, 40)).filter(
    lambda s: s[2] * s[3] >= 2
)


@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    offset=st.sampled_from([0.0, -3.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_properties_over_shapes_dtypes_and_ranges(shape, dtype, scale, offset, seed):
    x = (gaussian(*shape, seed=seed) * scale + offset).to(dtype)
    xf = x.float()
    ulp = 2 * torch.finfo(dtype).eps  # the output is rounded to the input's dtype
    for y, (lo, hi) in [
        (micro_clamp(x), _quantile_bounds(xf)),
    ]:
        assert y.dtype == dtype and y.shape == x.shape
        inside = (xf >= lo) & (xf <= hi)
        assert torch.equal(y[inside], x[inside])
        half = (hi - lo) / 2
        assert bool((y.float() <= hi + 0.25 * half + ulp * (1 + hi.abs())).all())
        assert bool((y.float() >= lo - 0.25 * half - ulp * (1 + lo.abs())).all())
    conf = structure_confidence(x)
    assert conf.shape == (shape[0], 1, shape[2], shape[3])
    assert float(conf.min()) >= 0.0 and float(conf.max()) <= 1.0
    y = aqclip(x, conf)
    centre, half = aqclip_corridor(x, conf)
    assert y.dtype == dtype and bool(torch.isfinite(y.float()).all())
    inside = (xf - centre).abs() <= half
    assert torch.equal(y[inside], x[inside])
    assert bool(((y.float() - centre).abs() <= 1.25 * half + ulp * (1 + centre.abs())).all())


def _quantile_bounds(xf):
    flat = xf.reshape(xf.shape[0], -1)
    ref = torch.quantile(flat, torch.tensor([0.001, 0.999]), dim=1)
    shape = (xf.shape[0],) + (1,) * (xf.dim() - 1)
    return ref[0].reshape(shape), ref[1].reshape(shape)


# -- extreme but finite inputs, scale safety (issue 7, item 5) -------------------------------------------------------


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_micro_clamp_near_the_fp32_limits_stays_finite(mode):
    # the corridor width hi - lo overflowed fp32 here and tanh(0) * inf gave NaN
    x = torch.tensor([[-3e38, 0.0, 3e38, 1.0]])
    y = micro_clamp(x, mode=mode)
    assert bool(torch.isfinite(y).all())
    lo, hi = torch.quantile(x, torch.tensor([0.001, 0.999]), dim=1)
    assert float(y.min()) >= float(lo) - 0.25 * (0.5 * float(hi) - 0.5 * float(lo))
    assert torch.equal(y[:, 1:2], x[:, 1:2])  # 0 is inside the corridor
    # opposite-sign neighbours near the limit: the quantile interpolation itself overflowed
    x2 = torch.tensor([[-3.3e38, 3.3e38]])
    lo2, hi2 = tail_quantiles(x2, 0.25)
    assert bool(torch.isfinite(lo2).all() and torch.isfinite(hi2).all())
    assert -3.3e38 <= float(lo2) <= float(hi2) <= 3.3e38
    assert bool(torch.isfinite(micro_clamp(x2, 0.25, mode=mode)).all())


def test_soft_clip_with_a_corridor_wider_than_fp32():
    x = torch.tensor([-3.4e38, 3.4e38, 0.0])
    y = soft_clip(x, torch.tensor(-3e38), torch.tensor(3e38), 0.25)
    assert bool(torch.isfinite(y).all()) and float(y[0]) < -3e38 and float(y[1]) > 3e38


@pytest.mark.parametrize("scale", [3e38 / 8, 1e30, 1e18, 1e-19, 1e-30, 1e-36])
def test_every_operator_acts_the_same_at_extreme_scales(scale):
    """AQClip went silent for |x| >= 1e18 (E[x^2] overflowed) and <= 1e-19 (underflow, absolute floor)."""
    x = gaussian(2, 4, 32, 32, seed=11)
    x[0, 1, 5, 5] = 8.0
    x[1, 2, 20, 9] = -7.0
    xs = x * scale
    for fn in (micro_clamp, aqclip, lambda t: aqclip(t, structure_confidence(t)), QSilk()):
        ref, out = fn(x), fn(xs)
        assert bool(torch.isfinite(out).all())
        # the same elements are changed (x * scale is rounded, so an element on a corridor edge may flip)
        assert int(((out != xs) != (ref != x)).sum()) <= 2 and int((ref != x).sum()) > 0
        torch.testing.assert_close(out / scale, ref, rtol=1e-5, atol=1e-6)
    assert float(aqclip(xs)[0, 1, 5, 5]) < 6.0 * scale  # the spike is clipped at any scale


@given(exponent=st.integers(-100, 100), seed=st.integers(0, 2**16))
def test_power_of_two_scaling_is_exactly_equivariant(exponent, seed):
    """Statistics are taken on x / 2^k (exact), so QSilk(x * 2^k) == QSilk(x) * 2^k bit for bit."""
    x = gaussian(2, 3, 20, 24, seed=seed)
    x[0, 0, 3, 4] = 9.0
    factor = 2.0**exponent
    stab = QSilk()
    assert torch.equal(stab(x * factor), stab(x) * factor)
    assert torch.equal(structure_confidence(x * factor), structure_confidence(x))


@given(
    values=st.lists(
        st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=8, max_size=64
    ),
    mode=st.sampled_from(["soft", "hard"]),
)
def test_finite_in_finite_out(values, mode):
    n = len(values) // 4 * 4
    x = torch.tensor(values[:n], dtype=torch.float32).reshape(1, 4, 1, n // 4)
    assert bool(torch.isfinite(micro_clamp(x, mode=mode)).all())
    assert bool(torch.isfinite(micro_clamp(x, mode=mode, per_channel=True)).all())
    assert bool(torch.isfinite(aqclip(x, tile=2, stride=1)).all())
    assert bool(torch.isfinite(aqclip(x, structure_confidence(x), tile=2, stride=1)).all())


# -- batched corridor (issue 7, item 17) and integer tiles (item 6) --------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 4, 16, 16), (64, 4, 16, 16), (100, 1, 32, 32), (7, 16, 13, 29)])
def test_batched_corridor_gives_each_sample_its_own_result_bit_for_bit(shape):
    """One batched computation; a sample's corridor and output are bit-identical alone and among batch mates
    (on the CPU; other devices' matrix kernels may round differently by batch size)."""
    x = gaussian(*shape, seed=shape[0])
    x, _ = with_spikes(x, count=4, size=9.0)
    conf = structure_confidence(x)
    centre, half = aqclip_corridor(x, conf)
    out = aqclip(x, conf)
    for i in (0, shape[0] // 2, shape[0] - 1):
        c1, h1 = aqclip_corridor(x[i : i + 1].clone(), conf[i : i + 1].clone())
        assert torch.equal(centre[i : i + 1], c1) and torch.equal(half[i : i + 1], h1)
        assert torch.equal(out[i : i + 1], aqclip(x[i : i + 1].clone(), conf[i : i + 1].clone()))
    # a batch mate scaled by 1e6 changes nothing for the others
    other = x.clone()
    other[1] *= 1e6
    assert torch.equal(aqclip_corridor(other, conf)[1][0], half[0])


def test_tile_and_stride_must_be_integers_whatever_was_called_before():
    x = gaussian(1, 4, 32, 32)
    aqclip(x, tile=16, stride=8)  # fills the matrix cache for (32, 16, 8)
    for tile, stride in [(16.0, 8), (16, 8.0), (True, 1)]:
        with pytest.raises(TypeError, match="must be an int"):
            aqclip(x, tile=tile, stride=stride)
    with pytest.raises(ValueError, match="k_min"):
        aqclip(x, k_min=1.0, k_max=float("inf"))


@pytest.mark.parametrize("size", [2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(2, 1, 7, 9), (1, 3, 16, 16), (1, 1, 5, 5)])
def test_box_mean_equals_avg_pool_without_padding_counts(size, shape):
    import torch.nn.functional as F

    from qsilk.ops.confidence import box_mean

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(size))
    ref = F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)[..., : shape[2], : shape[3]]
    torch.testing.assert_close(box_mean(x, size), ref, rtol=1e-6, atol=1e-7)


def test_bench_rows_and_raw_json(tmp_path):
    import json

    from qsilk.eval.bench import bench_ops, write_json

    rows = bench_ops(torch.device("cpu"), repeats=1, shapes=((3, 1, 16, 16),), min_seconds=0.0)
    assert rows[0]["shape"] == "3x1x16x16" and rows[0]["clamp_exact"] and rows[0]["qsilk_ms"] > 0
    path = tmp_path / "results" / "bench.json"
    write_json({"ops": rows}, str(path), ["--quick"])
    record = json.loads(path.read_text())
    assert record["ops"] == rows and record["command"].endswith("--quick") and not list(tmp_path.rglob("*.tmp"))


def test_non_finite_check_fast_path_and_overflowing_sums():
    big = torch.full((1, 4, 8, 8), 3e38)  # the sum overflows, every value is finite
    assert torch.equal(micro_clamp(big), big) and torch.equal(aqclip(big), big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = big.clone()
        x[0, 2, 3, 3] = bad
        with pytest.raises(ValueError, match="1 non-finite"):
            micro_clamp(x)
    x = gaussian(1, 4, 8, 8)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = float("inf"), -float("inf")  # the sum is NaN, not +-inf
    with pytest.raises(ValueError, match="2 non-finite"):
        aqclip(x)
    conf = torch.full((1, 1, 8, 8), 0.5)
    conf[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="confidence contains non-finite"):
        aqclip(gaussian(1, 4, 8, 8), conf)
