"""The reference QSilk formulas as published (qsilk-method.md section 2), defects included.

Only for side-by-side comparisons (speed, behaviour) with our operators; never used for sampling. Written from
the formulas, not from the reference code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_micro_clamp(x0: torch.Tensor, quantile: float = 0.001) -> torch.Tensor:
    """Per-sample hard clamp to [Q_q, Q_(1-q)] over C*H*W, with torch.quantile (full sort per sample)."""
    flat = x0.reshape(x0.shape[0], -1).float()
    bounds = torch.quantile(flat, torch.tensor([quantile, 1 - quantile], device=x0.device), dim=1)
    lo, hi = bounds[0][:, None], bounds[1][:, None]
    return flat.clamp(lo, hi).reshape_as(x0).to(x0.dtype)


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def reference_tile_confidence(x0: torch.Tensor, tile: int, stride: int) -> torch.Tensor:
    """Sobel gradient magnitude of the channel mean, averaged per tile, divided by the per-sample max:
    (B, n_tiles)."""
    mean = x0.float().mean(1, keepdim=True)
    kx = _SOBEL_X.to(x0.device).view(1, 1, 3, 3)
    gx = F.conv2d(mean, kx, padding=1)
    gy = F.conv2d(mean, kx.transpose(-1, -2), padding=1)
    magnitude = (gx * gx + gy * gy).sqrt()
    per_tile = F.avg_pool2d(magnitude, tile, stride).flatten(1)
    return per_tile / per_tile.amax(1, keepdim=True).clamp_min(1e-12)


def reference_aqclip(
    x0: torch.Tensor,
    tile: int = 32,
    stride: int = 16,
    alpha: float = 2.0,
    confidence: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-tile corridor from confidence-dependent quantile levels (pooled over channels), tanh contrast map,
    box-averaged overlapping tiles; elements no whole tile covers come out 0 (defect 3 of the reference)."""
    b, c, h, w = x0.shape
    x = x0.float()
    conf = reference_tile_confidence(x, tile, stride) if confidence is None else confidence
    normal = torch.distributions.Normal(0.0, 1.0)
    eps = 1e-6
    q_lo = (conf * conf / 2).clamp(eps, 0.5)
    q_hi = (1 - (1 - conf) ** 2 / 2).clamp(0.5, 1 - eps)
    k_lo, k_hi = normal.icdf(q_lo).abs(), normal.icdf(q_hi).abs()  # (B, L)
    patches = F.unfold(x, tile, stride=stride).view(b, c * tile * tile, -1)  # (B, C*t*t, L)
    mu = patches.mean(1)
    sd = patches.std(1, unbiased=False)
    lo, hi = mu - k_lo * sd, mu + k_hi * sd
    mid, half = ((lo + hi) / 2)[:, None], ((hi - lo) / 2).clamp_min(1e-6)[:, None]
    mapped = mid + half * torch.tanh(alpha * (patches - mid) / half)
    summed = F.fold(mapped, (h, w), tile, stride=stride)
    counts = F.fold(torch.ones_like(mapped), (h, w), tile, stride=stride)
    out = torch.where(counts > 0, summed / counts.clamp_min(1), torch.zeros_like(summed))
    return out.to(x0.dtype)
