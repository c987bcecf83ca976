"""Pure tensor functions behind the attention-entropy probe (imports only torch).

- :func:`attention_entropy`: entropy of each row of softmax(q k^T * scale + mask), in fp32.
- :func:`select_attention_mask`: the entries of an SDPA mask for the sampled rows/heads/queries only.
- :func:`token_grid`: the (h, w) grid a layer's token count lives on, given the base grid (aspect-aware).
- :func:`query_sample_grid` / :func:`centered_positions`: a deterministic, evenly spread sample of queries/heads.
- :func:`entropy_to_confidence`: normalised entropy map -> confidence = 1 - normalised entropy, in [0, 1].

Confidence keeps the absolute level: each row's entropy is divided by log N, N = the number of keys that row may
attend to (after masking), so a uniform row has normalised entropy 1 (confidence 0) and a one-hot row 0
(confidence 1), at every step and for every map. Nothing is stretched per sample: a map whose entropies all lie in
0.90-0.95 gives confidences 0.05-0.10, one in 0.10-0.15 gives 0.85-0.90.
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


def select_attention_mask(
    mask: Tensor,
    rows: tuple[int, int],
    head_index: Tensor,
    query_index: Tensor,
) -> Tensor:
    """The part of an SDPA ``attn_mask`` that the sampled (rows, heads, queries) see, without ever building the
    broadcast (B, heads, Q, K) mask: dimensions the mask broadcasts over (size 1) stay size 1, the others are sliced
    (rows) or gathered (heads and queries in one gather), so the largest tensor made is the result itself, at most
    rows x len(head_index) x len(query_index) x K.

    Returns a mask broadcastable to (rows, len(head_index), len(query_index), K), same dtype as ``mask``.
    """
    if mask.ndim > 4:
        raise ValueError(f"an attention mask has at most 4 dims (B, heads, Q, K), got {tuple(mask.shape)}")
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    start, stop = rows
    if mask.shape[0] != 1:
        mask = mask[start:stop]
    if mask.shape[1] != 1 and mask.shape[2] != 1:
        return mask[:, head_index[:, None], query_index[None, :]]
    if mask.shape[2] != 1:
        return mask.index_select(2, query_index)
    if mask.shape[1] != 1:
        return mask.index_select(1, head_index)
    return mask


def entropy_to_confidence(normalized_entropy: Tensor) -> Tensor:
    """Normalised entropy map (entropy / log N, in [0, 1]) -> confidence = 1 - it, in [0, 1], fp32.

    Pointwise, so a sample's map never depends on its batch mates and a sharper attention always means a higher
    confidence, whatever the rest of the map or the step.
    """
    return (1.0 - normalized_entropy.float()).clamp(0.0, 1.0)
