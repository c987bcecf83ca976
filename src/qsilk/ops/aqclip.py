"""AQClip: an adaptive, seam-free, per-tile quantile corridor whose width grows with confidence.

Tiles of ``tile`` x ``tile`` latent pixels start every ``stride`` pixels; the last row/column of tiles is aligned
with the border, so every element is covered without padding. Per tile and channel we take a robust centre
(mean) and spread (std). The per-tile statistics are blended into per-element fields with a strictly positive
Hann-like window (weights normalised), so a constant or smoothly varying input stays inside its corridor and
passes through unchanged. The corridor is ``centre +- (k_min + (k_max - k_min) * c) * std``: monotone in the
confidence c. Everything is separable, so tile statistics and blending are small matrix products per axis.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.nn.functional as F

from ._checks import all_finite, check_latent
from ._scale import pow2_scale
from .saturate import soft_clip

# Half-width floor relative to the channel's mean |x|: keeps flat tiles (std = 0) from clipping rounding noise.
_FLOOR_REL = 1e-4


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along one axis: every ``stride``, plus a border-aligned last tile; covers all of ``size``."""
    tile = min(tile, size)
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


AUTO = "auto"


def auto_tile(height: int, width: int) -> tuple[int, int]:
    """The tile and stride ``"auto"`` picks for an ``height`` x ``width`` latent: tile = min(H, W) // 4 clamped to
    [4, 16] (never beyond the latent), stride = tile // 2. 64x64 and larger latents (SD) get today's 16 / 8; the
    16x16 demo latent gets 4 / 2 (7 x 7 tiles) instead of a single 16-tile."""
    tile = min(max(min(height, width) // 4, 4), 16, min(height, width))
    return tile, max(1, tile // 2)


def resolve_tile(tile: int | str, stride: int | str, height: int, width: int) -> tuple[int, int]:
    """Integer (tile, stride) for a latent of ``height`` x ``width``: ``"auto"`` tile -> :func:`auto_tile` (its
    stride must be ``"auto"`` too); ``"auto"`` stride with an integer tile -> tile // 2."""
    if tile == AUTO:
        if stride != AUTO:
            raise ValueError(f"an 'auto' tile needs an 'auto' stride too, got stride={stride!r}")
        return auto_tile(height, width)
    if stride == AUTO:
        return tile, max(1, _index(tile, "tile") // 2)
    return tile, stride


@functools.lru_cache(maxsize=64)
def _axis_matrices(
    size: int, tile: int, stride: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(average, blend) matrices for one axis: avg (n, size) box-averages each tile; blend (size, n) spreads
    per-tile values back with a normalised window."""
    tile = min(tile, size)
    starts = torch.tensor(tile_starts(size, tile, stride), device=device)
    offset = torch.arange(size, device=device)[None, :] - starts[:, None]  # (n, size)
    inside = (offset >= 0) & (offset < tile)
    avg = inside.float() / tile
    window = torch.sin(math.pi * (offset.float() + 0.5) / tile).pow(2) * inside  # > 0 on the whole tile
    blend = (window / window.sum(0, keepdim=True)).T.contiguous()
    return avg, blend


def resize_confidence(confidence: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Confidence (B, 1, h, w) or (B, h, w) -> fp32 (B, 1, H, W) in [0, 1] on ``like``'s grid and device."""
    if confidence is None:
        return None
    c = confidence.detach().float().to(like.device)
    if c.dim() == 3:
        c = c.unsqueeze(1)
    if c.dim() != 4 or c.shape[1] != 1 or c.shape[0] not in (1, like.shape[0]):
        raise ValueError(
            f"confidence must be (B, 1, h, w) with B = {like.shape[0]} or 1, got shape {tuple(confidence.shape)}"
        )
    if not all_finite(c):
        raise ValueError("confidence contains non-finite values")
    if c.shape[-2:] != like.shape[-2:]:
        c = F.interpolate(c, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return c.clamp(0.0, 1.0).expand(like.shape[0], 1, *like.shape[-2:])


def _index(value, name: str) -> int:
    """Integers only (a float tile would silently depend on the matrix cache's earlier calls)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None


def _check_tiling(x0: torch.Tensor, tile, stride, k_min: float, k_max: float) -> tuple[int, int]:
    check_latent(x0, min_dim=4)
    if x0.dim() != 4:
        raise ValueError(f"aqclip needs (B, C, H, W) input, got shape {tuple(x0.shape)}")
    tile, stride = _index(tile, "tile"), _index(stride, "stride")
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be >= 1, got tile={tile}, stride={stride}")
    if stride > tile:
        raise ValueError(
            f"stride ({stride}) must not exceed tile ({tile}), or elements would be left uncovered"
        )
    if not (math.isfinite(k_min) and math.isfinite(k_max) and 0 <= k_min <= k_max):
        raise ValueError(f"need finite 0 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    return tile, stride


def _tile_fields(x: torch.Tensor, tile: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element (centre, spread) of fp32 ``x`` (B, C, H, W): per-tile mean and std blended with the window."""
    _, _, height, width = x.shape
    avg_h, blend_h = _axis_matrices(height, tile, stride, x.device)
    avg_w, blend_w = _axis_matrices(width, tile, stride, x.device)
    offset = x.mean(dim=(2, 3), keepdim=True)  # centring keeps E[x^2] - E[x]^2 well conditioned
    xc = x - offset
    # (n, H) @ (B, C, H, W) @ (W, m): batched products over (B, C); each output row sums one sample's values only
    mean = avg_h @ xc @ avg_w.T  # (B, C, nh, nw)
    var = (avg_h @ (xc * xc) @ avg_w.T - mean * mean).clamp_min(0.0)
    return blend_h @ mean @ blend_w.T + offset, blend_h @ var.sqrt() @ blend_w.T


def _half_width(x: torch.Tensor, spread: torch.Tensor, conf, k_min: float, k_max: float) -> torch.Tensor:
    c = conf if conf is not None else 0.5
    # Floors relative to the sample (never absolute): flat tiles must not clip rounding noise at any scale.
    floor = (
        _FLOOR_REL * x.abs().mean(dim=(2, 3), keepdim=True)
        + 1e-6 * spread.mean(dim=(1, 2, 3), keepdim=True)
        + 1e-12
    )
    return (k_min + (k_max - k_min) * c) * spread + floor


def aqclip_corridor(
    x0: torch.Tensor,
    confidence: torch.Tensor | None = None,
    tile: int = 16,
    stride: int = 8,
    k_min: float = 2.5,
    k_max: float = 4.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element corridor (centre, half-width), fp32 tensors shaped like ``x0`` (B, C, H, W).

    ``confidence``: (B, 1, h, w) in [0, 1], resized to the latent grid; None = uniform 0.5.

    The whole batch is computed at once; each sample's statistics involve only that sample (per-sample scale,
    per-sample channel means, products that never mix samples). Statistics are taken on ``x0 / s`` with ``s`` a
    per-sample power of two near max|x0|, so the corridor is exactly equivariant under power-of-two scaling and
    neither over- nor underflows for any finite input."""
    return _corridor(x0, None, confidence, tile, stride, k_min, k_max)


def conditional_corridor(
    x0: torch.Tensor,
    x0_cond: torch.Tensor,
    confidence: torch.Tensor | None = None,
    tile: int = 16,
    stride: int = 8,
    k_min: float = 2.5,
    k_max: float = 4.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AQClip's corridor for the guided ``x0`` whose width follows the *conditional* prediction ``x0_cond``.

    Centre: the per-tile mean of the guided ``x0`` (guidance may move a tile's level); half-width:
    ``(k_min + (k_max - k_min) * c) * std`` with the per-tile std of ``x0_cond``. Guidance extrapolates
    ``uncond + w (cond - uncond)``, which inflates local contrast by up to ``w``; a corridor sized by the
    conditional spread cuts that excess where it overshoots and leaves detail the model itself predicts alone.
    Shapes (B, C, H, W), equal; fp32 out; scale-equivariant like :func:`aqclip_corridor` (one power-of-two scale
    per sample, taken over both tensors)."""
    check_latent(x0_cond, "x0_cond", min_dim=4)
    if x0_cond.shape != x0.shape:
        raise ValueError(f"x0_cond must have x0's shape {tuple(x0.shape)}, got {tuple(x0_cond.shape)}")
    return _corridor(x0, x0_cond, confidence, tile, stride, k_min, k_max)


def _corridor(x0, spread_source, confidence, tile, stride, k_min, k_max) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, half-width): centre from ``x0``'s tiles, spread from ``spread_source``'s (None: ``x0`` itself, computed
    once), on one power-of-two scale per sample taken over both."""
    tile, stride = _check_tiling(x0, tile, stride, k_min, k_max)
    conf = resize_confidence(confidence, x0)
    x = x0.detach().float()
    scale = pow2_scale(x, (1, 2, 3))  # (B, 1, 1, 1)
    if spread_source is None:
        x = x / scale
        centre, spread = _tile_fields(x, tile, stride)
    else:
        source = spread_source.detach().float().to(x0.device)
        scale = torch.maximum(scale, pow2_scale(source, (1, 2, 3)))
        x = x / scale
        centre, _ = _tile_fields(x, tile, stride)
        _, spread = _tile_fields(source / scale, tile, stride)
    return centre * scale, _half_width(x, spread, conf, k_min, k_max) * scale


def apply_corridor(
    x0: torch.Tensor, centre: torch.Tensor, half: torch.Tensor, softness: float = 0.25
) -> torch.Tensor:
    """Soft-clip ``x0`` into [centre - half, centre + half] (identity inside)."""
    return soft_clip(x0, centre - half, centre + half, softness)


def aqclip(
    x0: torch.Tensor,
    confidence: torch.Tensor | None = None,
    tile: int = 16,
    stride: int = 8,
    k_min: float = 2.5,
    k_max: float = 4.5,
    softness: float = 0.25,
) -> torch.Tensor:
    """Adaptive quantile clip of ``x0`` (B, C, H, W); see the module docstring. Same dtype/device out."""
    if softness < 0:
        raise ValueError(f"softness must be >= 0, got {softness!r}")
    centre, half = aqclip_corridor(x0, confidence, tile, stride, k_min, k_max)
    return apply_corridor(x0, centre, half, softness)
