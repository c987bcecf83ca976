"""Structure-proxy confidence: where x0 has local structure (gradient energy), the model is taken as confident."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_fraction, check_latent
from ._scale import pow2_scale
from .quantile import upper_quantile


def gradient_energy(x0: torch.Tensor) -> torch.Tensor:
    """Per-element squared central-difference gradient, each channel scaled by its own variance, averaged over
    channels: (B, 1, H, W) fp32. Channels of different scales count equally."""
    x = x0.detach().float()
    x = x / pow2_scale(x, (2, 3))  # exact; keeps the variance finite and normal for any finite input
    if x.shape[-1] * x.shape[-2] > 1:
        centred = x - x.mean(dim=(2, 3), keepdim=True)
        std = (centred * centred).sum(dim=(2, 3), keepdim=True).div(x.shape[-1] * x.shape[-2] - 1).sqrt()
        x = x / std.clamp_min(1e-6)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) * 0.5
    dy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) * 0.5
    return (dx * dx + dy * dy).mean(dim=1, keepdim=True)


def _window_sum(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Sum over the window [i - size // 2, i - size // 2 + size) along ``dim``, zeros outside."""
    before = size // 2
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [before, size - 1 - before]
    padded = F.pad(x, pad)
    n = x.shape[dim]
    total = padded.narrow(dim, 0, n)
    for offset in range(1, size):
        total = total + padded.narrow(dim, offset, n)
    return total


def box_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over the ``size`` x ``size`` window around each element of (B, C, H, W), counting only elements inside
    the image: avg_pool2d(size, stride 1, padding size // 2, count_include_pad=False), separable and several
    times faster on the CPU for small latents."""
    height, width = x.shape[-2:]
    counts_h = _window_sum(x.new_ones(height, 1), size, 0)
    counts_w = _window_sum(x.new_ones(1, width), size, 1)
    return _window_sum(_window_sum(x, size, -2), size, -1) / (counts_h * counts_w)


def structure_confidence(x0: torch.Tensor, smooth: int = 3, quantile: float = 0.95) -> torch.Tensor:
    """Confidence map (B, 1, H, W) in [0, 1], fp32: gradient energy, box-smoothed over ``smooth`` pixels and
    divided by its per-sample ``quantile`` (robust to a few spikes, unlike the max). Flat samples give 0."""
    check_latent(x0, min_dim=4)
    if x0.dim() != 4:
        raise ValueError(f"structure_confidence needs (B, C, H, W) input, got shape {tuple(x0.shape)}")
    check_fraction(quantile, "quantile", open_low=True)
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    energy = gradient_energy(x0)
    if smooth > 1:
        energy = box_mean(energy, smooth)
    rows = energy.reshape(energy.shape[0], -1)
    scale = upper_quantile(rows, 1.0 - quantile) if quantile < 1 else rows.max(dim=1, keepdim=True).values
    scale = scale.reshape(-1, 1, 1, 1)
    conf = torch.where(scale > 0, energy / scale.clamp_min(1e-30), torch.zeros_like(energy))
    return conf.clamp(0.0, 1.0)
