"""Spectral fidelity: radially averaged log power spectra of generated vs reference images.

Per image (grey, Hann-windowed so the image border does not leak a cross of false high-frequency power):
P(f) = |FFT|^2 / (H W), averaged over rings of radius f (cycles per pixel, ring width 1 / min(H, W)), then
log10. The feature is that vector of ``min(H, W) // 2`` bins (bin 0 = DC, bin k ~ k / min(H, W) cycles/px).

Score (set means of the per-image log spectra, DC bin excluded), all in log10 units ("bels"):
  ``spectral_rms``       RMS over all bins of (generated - reference),
  ``spectral_rms_hf``    the same over the top band (f >= ``hf_start`` cycles/px, default 0.25 = upper half),
  ``spectral_hf_gap``    signed mean of (generated - reference) over the top band: < 0 means lost detail
                         (blur, smoothing), > 0 means extra high-frequency energy (noise, ringing, grids).
  ``spectral_mf_gap``    the same over the octave below (hf_start / 2 <= f < hf_start). Upsampled data sets keep
                         their real detail there: Fashion-MNIST at 64 px has no content above 14/64 = 0.22
                         cycles/px (28 px upsampled), so its top band holds only interpolation residue.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FeatureMetric, check_images, to_grey

POWER_FLOOR = 1e-12  # log10 floor of a bin: a flat image gives a finite spectrum


def _hann(n: int, dtype: torch.dtype) -> Tensor:
    return torch.hann_window(n, periodic=False, dtype=dtype) if n > 1 else torch.ones(n, dtype=dtype)


def radial_bins(height: int, width: int) -> tuple[Tensor, int]:
    """Ring index of every FFT coefficient (-1 outside the inscribed circle) and the number of rings."""
    n = min(height, width) // 2
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    radius = torch.sqrt(fy**2 + fx**2)
    index = torch.floor(radius * min(height, width) + 1e-9).long()
    index[index >= n] = -1
    return index, n


def power_spectrum(images: Tensor, window: bool = True) -> Tensor:
    """(B, C, H, W) in [0, 1] -> (B, H, W) power |FFT|^2 / (H W) of the grey image (mean removed, fp64)."""
    x = to_grey(images).double()
    x = x - x.mean((-2, -1), keepdim=True)
    if window:
        h, w = x.shape[-2:]
        win = _hann(h, x.dtype)[:, None] * _hann(w, x.dtype)[None, :]
        # Normalise the window's energy so the windowed power keeps the scale of the unwindowed one.
        x = x * win / win.pow(2).mean().sqrt()
    return torch.fft.fft2(x).abs().pow(2) / (x.shape[-1] * x.shape[-2])


def radial_log_spectrum(images: Tensor, window: bool = True) -> Tensor:
    """(B, C, H, W) in [0, 1] -> (B, min(H, W) // 2) log10 of the ring-averaged power (fp64)."""
    power = power_spectrum(images, window)
    index, n = radial_bins(*power.shape[-2:])
    flat, idx = power.flatten(1), index.flatten()
    keep = idx >= 0
    sums = torch.zeros(power.shape[0], n, dtype=power.dtype).index_add_(1, idx[keep], flat[:, keep])
    counts = torch.bincount(idx[keep], minlength=n).to(power.dtype)
    return torch.log10(sums / counts + POWER_FLOOR)


def band_frequencies(num_bins: int) -> Tensor:
    """Centre frequency (cycles/px) of each ring bin: bin k covers [k, k + 1) / (2 num_bins)."""
    return (torch.arange(num_bins, dtype=torch.float64) + 0.5) / (2 * num_bins)


def spectral_score(
    features: Tensor, reference_features: Tensor, hf_start: float = 0.25
) -> dict[str, float]:
    """Compare per-image log spectra (B, K) to reference ones (N, K); see the module docstring for the keys."""
    if features.ndim != 2 or reference_features.ndim != 2 or features.shape[1] != reference_features.shape[1]:
        raise ValueError(
            "spectra must be (N, K) with equal K (same image size); got "
            f"{tuple(features.shape)} and {tuple(reference_features.shape)}"
        )
    diff = (features.double().mean(0) - reference_features.double().mean(0))[1:]  # drop DC
    freqs = band_frequencies(features.shape[1])[1:]
    top = freqs >= hf_start
    mid = (freqs >= hf_start / 2) & ~top
    if not bool(top.any()) or not bool(mid.any()):
        raise ValueError(f"too few spectral bins for hf_start={hf_start} cycles/px ({features.shape[1]} bins)")
    return {
        "spectral_rms": float(diff.pow(2).mean().sqrt()),
        "spectral_rms_hf": float(diff[top].pow(2).mean().sqrt()),
        "spectral_hf_gap": float(diff[top].mean()),
        "spectral_mf_gap": float(diff[mid].mean()),
    }


class SpectralFidelity(FeatureMetric):
    """Radially averaged log power spectrum vs the reference: ``spectral_rms``, ``spectral_rms_hf``,
    ``spectral_hf_gap`` (negative = lost detail), ``spectral_mf_gap`` (the octave below). Per-sample feature: the
    radial log spectrum."""

    name = "spectral"
    higher_is_better = False

    def __init__(self, hf_start: float = 0.25, window: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < hf_start < 0.5:
            raise ValueError(f"hf_start must be in (0, 0.5) cycles/px, got {hf_start}")
        self.hf_start, self.window = hf_start, window

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return radial_log_spectrum(check_images(images), self.window)

    def score(self, features: Tensor, reference_features: Tensor | None = None) -> dict[str, float]:
        if reference_features is None:
            raise ValueError("SpectralFidelity needs reference spectra")
        return spectral_score(features, reference_features, self.hf_start)
