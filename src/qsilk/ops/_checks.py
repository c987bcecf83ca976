"""Input validation shared by the operators."""

from __future__ import annotations

import torch


def all_finite(x: torch.Tensor) -> bool:
    """No NaN/Inf in ``x``. Fast path: one fp32 sum (no temporaries) is finite iff no element is NaN/Inf, unless
    finite values overflow it (|x| near 3e38); only then the element-wise check (about 80x the cost of a sum)."""
    return bool(torch.isfinite(x.detach().sum(dtype=torch.float32))) or bool(torch.isfinite(x).all())


def check_latent(x: torch.Tensor, name: str = "x0", min_dim: int = 2) -> None:
    """Raise a clear error for non-tensors, integer tensors, too few dims or non-finite values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dims (batch first), got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name} contains {bad} non-finite value(s) (NaN/Inf); the sampler diverged upstream"
        )


def check_fraction(
    value: float, name: str, low: float = 0.0, high: float = 1.0, open_low: bool = False
) -> None:
    ok = (low < value if open_low else low <= value) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
