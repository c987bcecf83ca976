"""Micro-clamp: per-sample quantile corridor on x0, soft by default."""

from __future__ import annotations

import torch

from ._checks import check_latent
from .quantile import tail_quantiles
from .saturate import soft_clip


def micro_clamp_bounds(x0: torch.Tensor, quantile: float = 0.001, per_channel: bool = False):
    """(lo, hi) fp32 corridor per sample (shape (B, 1, ...)) or per sample and channel (shape (B, C, 1, ...))."""
    lead = 2 if per_channel else 1
    rows = x0.detach().reshape(-1, x0[(0,) * lead].numel())
    lo, hi = tail_quantiles(rows, quantile)
    shape = (*x0.shape[:lead],) + (1,) * (x0.dim() - lead)
    return lo.reshape(shape), hi.reshape(shape)


def micro_clamp(
    x0: torch.Tensor,
    quantile: float = 0.001,
    mode: str = "soft",
    per_channel: bool = False,
    softness: float = 0.25,
) -> torch.Tensor:
    """Limit each sample's extreme values to its [Q_q, Q_(1-q)] corridor (statistics over C*H*W, or per channel).

    ``mode="soft"``: identity inside, :func:`soft_clip` outside (overshoot <= softness * half-width).
    ``mode="hard"``: ``clamp`` to the corridor (the reference behaviour).
    """
    check_latent(x0)
    if mode not in ("soft", "hard"):
        raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
    if per_channel and x0.dim() < 3:
        raise ValueError(f"per_channel needs (B, C, ...) input, got shape {tuple(x0.shape)}")
    if softness < 0:
        raise ValueError(f"softness must be >= 0, got {softness!r}")
    lo, hi = micro_clamp_bounds(x0, quantile, per_channel)
    return soft_clip(x0, lo, hi, softness if mode == "soft" else 0.0)
