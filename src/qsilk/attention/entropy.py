"""Pure tensor functions behind the attention-entropy probe (imports only torch).

- :func:`attention_entropy`: entropy of each row of softmax(q k^T * scale + mask), in fp32.
- :func:`token_grid`: the (h, w) grid a layer's token count lives on, given the base grid (aspect-aware).
- :func:`query_sample_grid` / :func:`centered_positions`: a deterministic, evenly spread sample of queries/heads.
- :func:`entropy_to_confidence`: normalised entropy map -> confidence map in [0, 1], per sample.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


def attention_entropy(
    query: Tensor, key: Tensor, *, scale: float | None = None, attn_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Entropy (nats) of each attention row, computed in fp32.

    ``query`` (..., Q, D), ``key`` (..., K, D); ``attn_mask`` broadcastable to (..., Q, K), either boolean (True =
    may attend, as in SDPA) or additive float. ``scale`` defaults to 1/sqrt(D), as in
    ``F.scaled_dot_product_attention``.

    Returns ``(entropy, log_num_keys)``, both (..., Q): ``log_num_keys`` is the log of the number of keys each query
    can attend to, i.e. the largest entropy that row could have; dividing by it normalises the entropy to [0, 1].
    """
    q, k = query.float(), key.float()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    # 0 * log 0 = 0 for masked keys (p = 0, log p = -inf).
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1)
    if attn_mask is None:
        num_keys = torch.full_like(entropy, float(k.shape[-2]))
    else:
        num_keys = torch.isfinite(logits).sum(dim=-1).float()
    return entropy, num_keys.log()


def normalized_entropy(entropy: Tensor, log_num_keys: Tensor) -> Tensor:
    """Entropy / log(num_keys) in [0, 1]; a row with a single attendable key has entropy 0 and maps to 0."""
    return (entropy / log_num_keys.clamp_min(1e-12)).clamp(0.0, 1.0)


@lru_cache(maxsize=512)
def token_grid(num_tokens: int, base_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) token grid of a layer with ``num_tokens`` image tokens, or None if no grid fits.

    ``base_hw`` is the grid of the model input (latent H, W; for packed Flux latents the token grid itself). A layer
    at down-sampling factor f holds ceil(H/f) x ceil(W/f) tokens (UNet: stride-2 convolutions, f = 2^k) or
    floor(H/f) x floor(W/f) (patch embedding, f = patch size). Both counts are non-increasing in f and each side is
    too, so a matching count determines (h, w) uniquely; the aspect ratio is the true one, never a square guess.
    """
    base_h, base_w = base_hw
    for rounding in (math.ceil, math.floor):
        for factor in range(1, max(base_h, base_w) + 1):
            h, w = rounding(base_h / factor), rounding(base_w / factor)
            if h * w == num_tokens:
                return h, w
            if h * w < num_tokens:
                break
    return None


def query_sample_grid(h: int, w: int, max_queries: int) -> tuple[int, int]:
    """Shape (hs, ws) of the query sample: the finest stride s with ceil(h/s) * ceil(w/s) <= max_queries."""
    if max_queries < 1:
        raise ValueError(f"max_queries must be >= 1, got {max_queries}")
    stride = max(1, math.floor(math.sqrt(h * w / max_queries)))
    while math.ceil(h / stride) * math.ceil(w / stride) > max_queries:
        stride += 1
    return math.ceil(h / stride), math.ceil(w / stride)


def centered_positions(length: int, count: int, device: torch.device | str | None = None) -> Tensor:
    """``count`` distinct indices in [0, length), at the centres of ``count`` equal cells: floor((i + 1/2) L / n).

    Sampling cell centres means a (hs, ws) map of sampled queries resized with ``align_corners=False`` lands each
    sample exactly where its token is.
    """
    if not 1 <= count <= length:
        raise ValueError(f"need 1 <= count <= length, got count={count}, length={length}")
    centres = (torch.arange(count, device=device, dtype=torch.float64) + 0.5) * (length / count)
    return centres.floor().long()


def robust_minmax(x: Tensor, quantiles: tuple[float, float] = (0.02, 0.98), eps: float = 1e-6) -> Tensor:
    """Per-sample (dim 0) min-max scaling to [0, 1] between two quantiles, robust to a few outliers.

    A sample whose quantile span is below ``eps`` (a flat map) is returned unscaled, clamped to [0, 1]: stretching
    numerical noise to the full range would invent structure.
    """
    flat = x.flatten(1).float()
    levels = torch.tensor(quantiles, dtype=flat.dtype, device=flat.device)
    lo, hi = torch.quantile(flat, levels, dim=1, keepdim=True)
    span = hi - lo
    scaled = torch.where(span > eps, (flat - lo) / span.clamp_min(eps), flat)
    return scaled.clamp(0.0, 1.0).view_as(x)


def entropy_to_confidence(entropy: Tensor, quantiles: tuple[float, float] = (0.02, 0.98)) -> Tensor:
    """Normalised entropy map (B, 1, H, W) in [0, 1] -> confidence = 1 - robust per-sample min-max of it."""
    return 1.0 - robust_minmax(entropy, quantiles)
