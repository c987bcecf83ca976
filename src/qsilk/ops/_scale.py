"""Scale-safe statistics: divide by a power of two near max|x| before squaring or summing."""

from __future__ import annotations

import torch


def pow2_scale(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """fp32 power of two ``s`` with max|x| / s in [1, 2) over ``dims`` (keepdim; 1 where x is all zero).

    Dividing by a power of two is exact, so statistics computed on ``x / s`` and multiplied back by ``s`` are
    exactly scale-equivariant under power-of-two scaling, and E[x^2] neither overflows (|x| near 3e38) nor
    underflows (|x| near 1e-19 and below)."""
    amax = x.detach().float().abs().amax(dim=dims, keepdim=True)
    _, exponent = torch.frexp(amax)  # amax = m * 2**exponent, m in [0.5, 1)
    # 2**(exponent - 1) <= amax: at most 2**127 (finite in fp32) for amax up to the fp32 maximum
    scale = torch.exp2((exponent - 1).float())
    return torch.where(amax > 0, scale, torch.ones_like(scale))
