"""Soft saturation into a corridor: the identity inside, a smooth bounded roll-off outside."""

from __future__ import annotations

import torch


def soft_clip(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, softness: float) -> torch.Tensor:
    """Map ``x`` into (lo - m, hi + m) with m = softness * (hi - lo) / 2.

    Inside [lo, hi] values come back bit-identical. Outside, ``hi + m * tanh((x - hi) / m)`` (and its mirror):
    value and slope are continuous at the edges and the overshoot is bounded by m. ``softness = 0`` is a hard
    clamp. ``lo``/``hi`` broadcast against ``x``; arithmetic is fp32, the result has ``x``'s dtype.
    """
    xf = x.float()
    inside = (xf >= lo) & (xf <= hi)
    if softness <= 0:
        out = torch.minimum(torch.maximum(xf, lo), hi)
    else:
        margin = (softness * 0.5 * (hi - lo)).clamp_min(torch.finfo(torch.float32).tiny)
        above = hi + margin * torch.tanh((xf - hi) / margin)
        below = lo - margin * torch.tanh((lo - xf) / margin)
        out = torch.where(xf > hi, above, below)
    return torch.where(inside, x, out.to(x.dtype))
