"""Detail-preserving companions of the clip operators: they decide how much of a clip's change to keep.

QSilk's corridors cut peaks, and a cut peak is high-frequency energy: on few-step samplers that deepens the
high-frequency deficit (smoothing wins FID, but loses detail). Both operators here take the tensor before and after
a clip and give back part of the change:

- :func:`edge_gate`: undo the change where the confidence map marks structure (edges, texture), so only
  low-confidence outliers are clipped.
- :func:`restore_high_frequencies`: ``after + strength * highpass(before - after)``: keep the clip's low-frequency
  correction (the range fix) and give back the high-frequency part of what it removed.

Both are the identity when the clip changed nothing, keep dtype and device, compute in fp32 and never mix samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import all_finite, check_latent
from ._scale import pow2_scale


def _check_pair(before: torch.Tensor, after: torch.Tensor) -> None:
    check_latent(before, "before", min_dim=4)
    check_latent(after, "after", min_dim=4)
    if before.dim() != 4 or before.shape != after.shape:
        raise ValueError(
            f"before and after must be (B, C, H, W) of one shape, got {tuple(before.shape)} and {tuple(after.shape)}"
        )


def _gate_weight(confidence: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """0 below ``low``, 1 at and above ``high``, linear between (a step at ``low`` when low == high)."""
    if high > low:
        return ((confidence - low) / (high - low)).clamp(0.0, 1.0)
    return (confidence >= low).float()


def edge_gate(
    before: torch.Tensor,
    after: torch.Tensor,
    confidence: torch.Tensor,
    low: float = 0.5,
    high: float = 0.9,
) -> torch.Tensor:
    """Give back a clip's change where ``confidence`` (B or 1, 1, H, W) in [0, 1] is high.

    Weight w = clamp((c - low) / (high - low), 0, 1); out = after + w * (before - after). Where w = 0 or the clip
    changed nothing, ``after`` comes back bit-identical; where w = 1, ``before`` does. Same dtype as ``after``."""
    _check_pair(before, after)
    if not (0.0 <= low <= high <= 1.0):
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low!r}, high={high!r}")
    if not isinstance(confidence, torch.Tensor) or confidence.dim() != 4 or confidence.shape[1] != 1:
        shape = tuple(confidence.shape) if isinstance(confidence, torch.Tensor) else type(confidence).__name__
        raise ValueError(f"confidence must be (B, 1, H, W), got {shape}")
    if confidence.shape[-2:] != after.shape[-2:] or confidence.shape[0] not in (1, after.shape[0]):
        raise ValueError(
            f"confidence {tuple(confidence.shape)} does not match the latent {tuple(after.shape)}"
        )
    if not all_finite(confidence):
        raise ValueError("confidence contains non-finite values")
    w = _gate_weight(confidence.detach().float().to(after.device).clamp(0.0, 1.0), low, high)
    changed = before.ne(after)
    if not bool(changed.any()):
        return after
    a = after.float()
    mixed = (a + w * (before.float() - a)).to(after.dtype)
    # torch.where keeps ungated elements bit-identical and fully gated ones exactly ``before`` (a + (b - a) need
    # not round to b)
    mixed = torch.where(w >= 1, before.to(after.dtype), mixed)
    return torch.where(changed & (w > 0), mixed, after)


def binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 binomial low-pass ([1, 2, 1] / 4 per axis) of (B, C, H, W), fp32, reflected borders (replicated on an
    axis of length 1). Its response is cos^2(pi f) per axis: 1 at DC, 0 at the Nyquist frequency, so a constant
    passes unchanged and a checkerboard is removed entirely."""
    x = x.float()
    for dim in (-1, -2):
        n = x.shape[dim]
        pad = [1, 1, 0, 0] if dim == -1 else [0, 0, 1, 1]
        padded = F.pad(x, pad, mode="reflect" if n > 1 else "replicate")
        x = 0.25 * padded.narrow(dim, 0, n) + 0.5 * padded.narrow(dim, 1, n) + 0.25 * padded.narrow(dim, 2, n)
    return x


def highpass(x: torch.Tensor) -> torch.Tensor:
    """``x - binomial_blur(x)`` in fp32: 0 for a constant, the input itself for a checkerboard."""
    return x.float() - binomial_blur(x)


def restore_high_frequencies(
    before: torch.Tensor, after: torch.Tensor, strength: float = 1.0
) -> torch.Tensor:
    """``after + strength * highpass(before - after)``, in ``after``'s dtype.

    With strength 1 this is ``before - lowpass(before - after)``: the clip's low-frequency correction stays, the
    high-frequency energy it removed comes back (at the Nyquist frequency entirely). ``strength`` in [0, 1];
    0 or an unchanged tensor gives ``after`` back bit-identical."""
    _check_pair(before, after)
    if not (0.0 <= strength <= 1.0):
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    if strength == 0.0 or torch.equal(before, after):
        return after
    # Work on x / s (s a per-sample power of two near max|x|: exact) so the difference cannot overflow, and keep
    # the result inside the dtype's range: finite in, finite out.
    scale = torch.maximum(pow2_scale(before, (1, 2, 3)), pow2_scale(after, (1, 2, 3)))
    a = after.float() / scale
    out = (a + strength * highpass(before.float() / scale - a)) * scale
    limit = torch.finfo(after.dtype).max
    return out.clamp(-limit, limit).to(after.dtype)


__all__ = ["binomial_blur", "edge_gate", "highpass", "restore_high_frequencies"]
