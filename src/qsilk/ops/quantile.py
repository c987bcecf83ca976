"""Exact per-row tail quantiles without a full sort.

``torch.quantile`` sorts every row (O(N log N)) and refuses inputs above 16M elements. A clamp only needs the
two tails, so we take the k smallest / largest values with ``topk`` and reproduce torch.quantile's linear
interpolation bit for bit (same fp32 rank arithmetic, same ``lerp``).
"""

from __future__ import annotations

import math
import struct

import torch

# Above this fraction of the row, a sort is cheaper than two top-k selections.
_TOPK_LIMIT = 0.125


def _f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _rank(q: float, n: int) -> tuple[int, int, float]:
    # torch.quantile computes the rank in the input's floating type (fp32 here); so do we, in plain Python:
    # the double product of two fp32 values is exact, so one rounding to fp32 gives torch's result.
    rank = _f32(_f32(q) * _f32(n - 1))
    below = math.floor(rank)
    return below, math.ceil(rank), rank - below  # rank - floor(rank) is exact in fp32


def _lerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """torch.lerp (bit for bit, as torch.quantile uses it) where finite; where b - a overflows (values of opposite
    sign near the fp32 limits) the overflow-free convex form a (1 - w) + b w, which lies between a and b."""
    out = a.lerp(b, w)
    return torch.where(torch.isfinite(out), out, a * (1.0 - w) + b * w)


def _checked_rows(rows: torch.Tensor, q: float) -> torch.Tensor:
    """``rows`` as fp32 after checking its shape and the tail fraction ``q``."""
    if rows.dim() != 2:
        raise ValueError(f"rows must be 2-D (rows, values), got shape {tuple(rows.shape)}")
    if not 0.0 < q <= 0.5:
        raise ValueError(f"quantile must be in (0, 0.5], got {q!r}")
    return rows.float()


def upper_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """Q_(1-q) of each row, shape (R, 1): the upper half of :func:`tail_quantiles` without selecting the lower
    tail. Equal to torch.quantile bit for bit."""
    rows = _checked_rows(rows, q)
    n = rows.shape[1]
    hi_b, hi_a, hi_w = _rank(1.0 - q, n)
    if n - hi_b > _TOPK_LIMIT * n:
        ordered = rows.sort(dim=1).values
        return _lerp(ordered[:, hi_b : hi_b + 1], ordered[:, hi_a : hi_a + 1], hi_w)
    large = rows.topk(n - hi_b, dim=1, largest=True, sorted=True).values  # large[:, j] = rank n-1-j
    return _lerp(large[:, n - 1 - hi_b : n - hi_b], large[:, n - 1 - hi_a : n - hi_a], hi_w)


def tail_quantiles(rows: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (Q_q, Q_(1-q)) of each row of a 2-D fp32 tensor, shape (R, 1) each, equal to torch.quantile.

    q must be in (0, 0.5]."""
    rows = _checked_rows(rows, q)
    n = rows.shape[1]
    lo_b, lo_a, lo_w = _rank(q, n)
    hi_b, hi_a, hi_w = _rank(1.0 - q, n)
    if lo_a + 1 > _TOPK_LIMIT * n:
        ordered = rows.sort(dim=1).values
        lo = _lerp(ordered[:, lo_b : lo_b + 1], ordered[:, lo_a : lo_a + 1], lo_w)
        hi = _lerp(ordered[:, hi_b : hi_b + 1], ordered[:, hi_a : hi_a + 1], hi_w)
        return lo, hi
    small = rows.topk(lo_a + 1, dim=1, largest=False, sorted=True).values  # small[:, i] = i-th smallest
    lo = _lerp(small[:, lo_b : lo_b + 1], small[:, lo_a : lo_a + 1], lo_w)
    k_hi = n - hi_b  # the (n - hi_b) largest cover ranks hi_b .. n-1
    large = rows.topk(k_hi, dim=1, largest=True, sorted=True).values  # large[:, j] = rank n-1-j
    hi = _lerp(large[:, n - 1 - hi_b : n - hi_b], large[:, n - 1 - hi_a : n - hi_a], hi_w)
    return lo, hi
