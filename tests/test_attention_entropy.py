"""Pure tensor functions of the attention-entropy probe, against independent computations."""

import math

import pytest
import torch

from qsilk.attention.entropy import (
    attention_entropy,
    centered_positions,
    entropy_to_confidence,
    normalized_entropy,
    query_sample_grid,
    select_attention_mask,
    token_grid,
)

torch.set_num_threads(1)


def explicit_entropy(q, k, scale, additive_mask=None):
    """softmax(q k^T * scale + mask) row entropies in float64, the textbook way."""
    logits = torch.einsum("...qd,...kd->...qk", q.double(), k.double()) * scale
    if additive_mask is not None:
        logits = logits + additive_mask.double()
    p = torch.softmax(logits, dim=-1)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def test_entropy_matches_explicit_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=gen), torch.randn(2, 3, 11, 8, generator=gen)
    entropy, log_n = attention_entropy(q, k)
    torch.testing.assert_close(entropy.double(), explicit_entropy(q, k, 8**-0.5), atol=1e-5, rtol=0)
    assert torch.allclose(log_n, torch.full_like(log_n, math.log(11)))
    entropy_scaled, _ = attention_entropy(q, k, scale=0.7)
    torch.testing.assert_close(entropy_scaled.double(), explicit_entropy(q, k, 0.7), atol=1e-5, rtol=0)


def test_entropy_with_masks():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 4, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen)
    allowed = torch.tensor([True, True, False, True, False, True])
    entropy, log_n = attention_entropy(q, k, attn_mask=allowed)
    expected = explicit_entropy(q[..., :, :], k[..., allowed, :], 8**-0.5)
    torch.testing.assert_close(entropy.double(), expected, atol=1e-5, rtol=0)
    assert torch.allclose(log_n, torch.full_like(log_n, math.log(4)))
    bias = torch.randn(4, 6, generator=gen)
    entropy_bias, _ = attention_entropy(q, k, attn_mask=bias)
    torch.testing.assert_close(
        entropy_bias.double(), explicit_entropy(q, k, 8**-0.5, bias), atol=1e-5, rtol=0
    )


def test_entropy_extremes_and_dtype():
    k = torch.randn(1, 1, 16, 4)
    uniform, log_n = attention_entropy(torch.zeros(1, 1, 3, 4), k)
    assert torch.allclose(normalized_entropy(uniform, log_n), torch.ones(1, 1, 3))
    peaked, log_n = attention_entropy(1e4 * k[:, :, :3], k)  # each query matches its own key by far
    assert normalized_entropy(peaked, log_n).max() < 1e-3
    half, _ = attention_entropy(torch.randn(1, 1, 3, 4).bfloat16(), k.bfloat16())
    assert half.dtype == torch.float32


@pytest.mark.parametrize(
    ("tokens", "base", "grid"),
    [
        (960, (24, 40), (24, 40)),
        (240, (24, 40), (12, 20)),  # UNet level 1 or a patch-2 transformer
        (60, (24, 40), (6, 10)),
        (15, (24, 40), (3, 5)),
        (273, (25, 41), (13, 21)),  # stride-2 convolutions round up
        (240, (25, 41), (12, 20)),  # patch embedding rounds down
        (7, (24, 40), None),
    ],
)
def test_token_grid(tokens, base, grid):
    assert token_grid(tokens, base) == grid


def test_query_sample_grid_respects_budget_and_aspect():
    for h, w, budget in [(64, 64, 256), (24, 40, 100), (8, 8, 256), (3, 97, 10), (128, 128, 1)]:
        hs, ws = query_sample_grid(h, w, budget)
        assert hs * ws <= budget and hs <= h and ws <= w
        if budget >= h * w:
            assert (hs, ws) == (h, w)
    assert query_sample_grid(64, 64, 256) == (16, 16)
    assert query_sample_grid(24, 40, 100) == (6, 10)


def test_centered_positions():
    for length, count in [(10, 3), (7, 7), (64, 16), (5, 1)]:
        positions = centered_positions(length, count).tolist()
        assert positions == sorted(set(positions)) and positions[0] >= 0 and positions[-1] < length
        assert positions == [math.floor((i + 0.5) * length / count) for i in range(count)]
    with pytest.raises(ValueError):
        centered_positions(3, 4)


def test_confidence_keeps_the_absolute_level():
    """1 - normalised entropy, pointwise: no per-sample stretch, so the level of a map survives."""
    gen = torch.Generator().manual_seed(2)
    sharp = 0.10 + 0.05 * torch.rand(1, 1, 6, 10, generator=gen)  # normalised entropies in [0.10, 0.15]
    diffuse = 0.90 + 0.05 * torch.rand(1, 1, 6, 10, generator=gen)  # ... in [0.90, 0.95]
    confidence = entropy_to_confidence(torch.cat([sharp, diffuse]))
    assert confidence.dtype == torch.float32
    torch.testing.assert_close(confidence[0], 1 - sharp[0])
    torch.testing.assert_close(confidence[1], 1 - diffuse[0])
    assert confidence[0].min() >= 0.85 - 1e-6 and confidence[1].max() <= 0.10 + 1e-6
    # Pointwise, so a sample's map never depends on its batch mates.
    assert torch.equal(entropy_to_confidence(diffuse), confidence[1:])
    # Bounded even for slightly out-of-range inputs (rounding).
    edge = entropy_to_confidence(torch.tensor([-1e-7, 0.0, 1.0, 1.0 + 1e-7]))
    assert edge.tolist() == [1.0, 1.0, 0.0, 0.0]


def confidence_of(q, k, mask=None):
    entropy, log_n = attention_entropy(q, k, attn_mask=mask)
    return entropy_to_confidence(normalized_entropy(entropy, log_n))


def test_sharper_attention_gives_higher_confidence():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 1, 8, 16, generator=gen), torch.randn(1, 1, 64, 16, generator=gen)
    gains = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]  # query gain: 0 = uniform attention, larger = sharper
    means = [float(confidence_of(gain * q, k).mean()) for gain in gains]
    assert means[0] == pytest.approx(0.0, abs=1e-6)  # uniform over 64 keys: entropy = log 64 exactly
    assert all(b > a for a, b in zip(means, means[1:], strict=False)), means
    assert means[-1] > 0.5


def test_confidence_known_answer():
    """Confidence against a float64 softmax entropy computed here, on hand-built attention rows."""
    n = 8
    # Logits chosen per row: one-hot-like, two equal peaks, uniform, and a known three-level distribution.
    rows = torch.tensor(
        [
            [50.0] + [0.0] * (n - 1),
            [50.0, 50.0] + [0.0] * (n - 2),
            [0.0] * n,
            [math.log(4.0), math.log(2.0), math.log(2.0)] + [-math.inf] * (n - 3),
        ]
    )
    # q k^T = rows with q = rows (scale 1 below) and k = identity: logits are the rows themselves.
    q = torch.where(torch.isfinite(rows), rows, torch.full_like(rows, -1e4))[None, None]
    k = torch.eye(n)[None, None]
    mask = torch.isfinite(rows)[None, None]
    entropy, log_n = attention_entropy(q, k, scale=1.0, attn_mask=mask)
    confidence = entropy_to_confidence(normalized_entropy(entropy, log_n))[0, 0].double()
    # Independent answers: H(p) / log(allowed keys).
    p_last = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    expected = torch.tensor(
        [
            1.0,  # H ~ 0
            1.0 - math.log(2) / math.log(n),
            0.0,
            1.0 - float(-(p_last * p_last.log()).sum()) / math.log(3),  # 1.5 ln 2 / ln 3
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(confidence, expected, atol=1e-5, rtol=0)
    # Random rows: the probe's chain equals 1 - H / log N from the explicit softmax.
    gen = torch.Generator().manual_seed(4)
    qr, kr = torch.randn(2, 3, 5, 8, generator=gen), torch.randn(2, 3, 40, 8, generator=gen)
    expected_random = 1 - explicit_entropy(qr, kr, 8**-0.5) / math.log(40)
    torch.testing.assert_close(confidence_of(qr, kr).double(), expected_random, atol=1e-5, rtol=0)


# -- mask selection ------------------------------------------------------------------------------------------------


def naive_mask_selection(mask, full_shape, rows, head_index, query_index):
    """The obvious (and memory-hungry) way: broadcast to (B, heads, Q, K), then index."""
    full = torch.broadcast_to(mask, full_shape)[rows[0] : rows[1]]
    return full[:, head_index][:, :, query_index]


@pytest.mark.parametrize(
    "mask_shape",
    [(12, 12), (1, 12), (2, 1, 1, 12), (2, 4, 12, 12), (4, 12, 12), (2, 1, 12, 12), (2, 4, 1, 12)],
)
@pytest.mark.parametrize("as_bool", [True, False])
def test_select_attention_mask_matches_broadcast_then_index(mask_shape, as_bool):
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(mask_shape, generator=gen) > 0.3 if as_bool else torch.randn(mask_shape, generator=gen)
    full_shape = (2, 4, 12, 12)
    head_index, query_index = torch.tensor([0, 3]), torch.tensor([1, 5, 6, 11])
    for rows in [(0, 2), (1, 2), (0, 1)]:
        selected = select_attention_mask(mask, rows, head_index, query_index)
        assert selected.dtype == mask.dtype
        expected = naive_mask_selection(mask, full_shape, rows, head_index, query_index)
        assert torch.equal(torch.broadcast_to(selected, expected.shape), expected)
        # Dimensions the mask broadcasts over stay size 1: nothing is expanded.
        assert selected.numel() <= expected.numel()
        padded = (1,) * (4 - len(mask_shape)) + tuple(mask_shape)
        assert all(got == 1 for got, given in zip(selected.shape, padded, strict=True) if given == 1)
    with pytest.raises(ValueError, match="at most 4 dims"):
        select_attention_mask(torch.ones(1, 1, 1, 1, 12), (0, 1), head_index, query_index)
