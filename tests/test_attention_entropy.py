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


def test_confidence_is_per_sample_monotone_and_bounded():
    gen = torch.Generator().manual_seed(2)
    entropy = torch.rand(3, 1, 6, 10, generator=gen)
    confidence = entropy_to_confidence(entropy)
    assert confidence.shape == entropy.shape and confidence.min() >= 0 and confidence.max() <= 1
    # Lower entropy -> higher confidence within each sample.
    order = entropy[0].flatten().argsort()
    assert (confidence[0].flatten()[order].diff() <= 1e-6).all()
    # Batch independence: a sample's map does not depend on its batch mates.
    alone = entropy_to_confidence(entropy[1:2])
    assert torch.equal(alone, confidence[1:2])
    # A flat map stays flat at 1 - entropy instead of stretching noise.
    flat = entropy_to_confidence(torch.full((1, 1, 4, 4), 0.25))
    assert torch.allclose(flat, torch.full_like(flat, 0.75))
