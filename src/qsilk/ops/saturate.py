"""Soft saturation into a corridor: the identity inside, a smooth bounded roll-off outside."""

from __future__ import annotations

import torch


def soft_clip(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, softness: float) -> torch.Tensor:
    """Map ``x`` into (lo - m, hi + m) with m = softness * (hi - lo) / 2.

    Inside [lo, hi] values come back bit-identical. Outside, ``hi + m * tanh((x - hi) / m)`` (and its mirror):
    value and slope are continuous at the edges and the overshoot is bounded by m. ``softness = 0`` is a hard
    clamp. ``lo``/``hi`` broadcast against ``x``; arithmetic is fp32, the result has ``x``'s dtype. Only the
    (usually few) out-of-corridor elements are computed; when there are none, ``x`` itself is returned.
    """
    xf = x.float()
    outside = (xf < lo) | (xf > hi)
    if not bool(outside.any()):
        return x
    where = outside.nonzero(as_tuple=True)
    v = xf[where]
    lo_v = lo.float().expand_as(xf)[where]
    hi_v = hi.float().expand_as(xf)[where]
    if softness <= 0:
        y = torch.minimum(torch.maximum(v, lo_v), hi_v)
    else:
        # Halve before subtracting: hi - lo overflows fp32 for corridors wider than 3.4e38 (then tanh * inf = NaN).
        finfo = torch.finfo(torch.float32)
        margin = (softness * (0.5 * hi_v - 0.5 * lo_v)).clamp(finfo.tiny, finfo.max)
        edge = torch.where(v > hi_v, hi_v, lo_v)
        y = edge + margin * torch.tanh((v - edge) / margin)
        # y lies between the edge and v; only rounding at the very top of the fp32 range could leave that interval
        y = torch.minimum(torch.maximum(y, torch.minimum(edge, v)), torch.maximum(edge, v))
    out = x.clone()
    out[where] = y.to(x.dtype)
    return out
