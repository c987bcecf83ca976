"""Artifact energy: grids at the autoencoder/patch stride, and halos/ringing beside strong edges.

**Stride harmonics.** A decoder that upsamples by ``s`` (or a DiT whose patches cover ``s`` pixels) leaves a
faint period-``s`` grid; its power sits on the frequency lattice (a / s, b / s) cycles/px, (a, b) != (0, 0).
Per image: ``harmonic_s{s}`` = log10 of (mean power on the lattice) / (mean power of the bins 1-2 steps around
each lattice point), on the unwindowed spectrum of the grey image (lattice frequencies fall on exact bins when s
divides the size, so a grid does not leak into its neighbours). About 0 for grid-free images, > 0 with a grid.
Defaults for the demo model: 4 (the autoencoder downsamples by 4) and 8 (DiT patch 2 on the 4x latent).

**Halo / ringing.** Strong edges are pixels whose Sobel gradient (normalised so a unit step reads 1) exceeds
``edge_threshold``; the band beside them is the pixels 2-3 px away (a 7x7 dilation of the edges minus a 3x3 one).
A clean edge is flat there; overshoot and ringing put high-pass energy there. ``halo_rms`` = RMS of
(image - 3x3 binomial blur) over the band pixels of the whole set (pooled, so edge-free images weigh nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import FeatureMetric, check_images, to_grey
from .spectral import power_spectrum

DEFAULT_STRIDES = (4, 8)


def lattice_masks(height: int, width: int, stride: int, reach: int = 2) -> tuple[Tensor, Tensor]:
    """Boolean (H, W) FFT-index masks: the stride lattice (without DC) and the bins within ``reach`` of it."""
    if stride < 2:
        raise ValueError(f"stride must be >= 2, got {stride}")
    rows = {round(a * height / stride) % height for a in range(stride)}
    cols = {round(b * width / stride) % width for b in range(stride)}
    lattice = torch.zeros(height, width, dtype=torch.bool)
    for r in rows:
        for c in cols:
            lattice[r, c] = True
    lattice[0, 0] = False
    near = torch.zeros_like(lattice)
    for dr in range(-reach, reach + 1):
        for dc in range(-reach, reach + 1):
            near |= torch.roll(lattice, (dr, dc), (0, 1))
    neighbours = near & ~lattice
    neighbours[0, 0] = False
    if not bool(neighbours.any()):
        raise ValueError(f"stride {stride} leaves no neighbouring frequencies on a {height}x{width} image")
    return lattice, neighbours


def harmonic_energy(images: Tensor, stride: int) -> Tensor:
    """(B, C, H, W) in [0, 1] -> (B,) log10(lattice power / neighbour power) at ``stride`` (see module doc)."""
    power = power_spectrum(images, window=False)
    lattice, neighbours = lattice_masks(*power.shape[-2:], stride)
    on = power[:, lattice].mean(1)
    around = power[:, neighbours].mean(1)
    floor = 1e-20
    return torch.log10((on + floor) / (around + floor))


def _sobel_magnitude(x: Tensor) -> Tensor:
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype) / 4.0
    k = torch.stack([kx, kx.T])[:, None]
    g = F.conv2d(F.pad(x[:, None], (1, 1, 1, 1), mode="replicate"), k)
    return g.pow(2).sum(1).sqrt()


def _dilate(mask: Tensor, radius: int) -> Tensor:
    return F.max_pool2d(mask[:, None].double(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def halo_terms(images: Tensor, edge_threshold: float = 0.25) -> Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 2): [sum of squared high-pass over the edge band, band pixel count], both
    divided by H*W (so the set's halo RMS is sqrt(sum column 0 / sum column 1))."""
    x = to_grey(images).double()
    edges = _sobel_magnitude(x) > edge_threshold
    band = _dilate(edges, 3) & ~_dilate(edges, 1)
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype) / 4.0
    blur = F.conv2d(F.pad(x[:, None], (1, 1, 1, 1), mode="replicate"), (k1[:, None] * k1[None, :])[None, None])
    residual = (x - blur[:, 0]).pow(2)
    area = x.shape[-1] * x.shape[-2]
    return torch.stack([(residual * band).sum((-2, -1)) / area, band.sum((-2, -1)).double() / area], 1)


def artifact_features(
    images: Tensor, strides: tuple[int, ...] = DEFAULT_STRIDES, edge_threshold: float = 0.25
) -> Tensor:
    """(B, C, H, W) -> (B, len(strides) + 2): harmonic energy per stride, then the two halo terms."""
    parts = [harmonic_energy(images, s)[:, None] for s in strides]
    return torch.cat([*parts, halo_terms(images, edge_threshold)], 1)


def artifact_score(
    features: Tensor, reference_features: Tensor | None = None, strides: tuple[int, ...] = DEFAULT_STRIDES
) -> dict[str, float]:
    if features.ndim != 2 or features.shape[1] != len(strides) + 2:
        raise ValueError(f"artifact features must be (N, {len(strides) + 2}), got {tuple(features.shape)}")
    f = features.double()
    out = {f"harmonic_s{s}": float(f[:, i].mean()) for i, s in enumerate(strides)}
    band = float(f[:, -1].sum())
    out["halo_rms"] = float((f[:, -2].sum() / band).sqrt()) if band > 0 else 0.0
    out["edge_band_fraction"] = float(f[:, -1].mean())
    if reference_features is not None:
        ref = artifact_score(reference_features, None, strides)
        for key in [*(f"harmonic_s{s}" for s in strides), "halo_rms"]:
            out[f"{key}_delta"] = out[key] - ref[key]
    return out


class ArtifactEnergy(FeatureMetric):
    """Keys: ``harmonic_s4``, ``harmonic_s8`` (per ``strides``), ``halo_rms``, ``edge_band_fraction``; with a
    reference also ``*_delta`` (generated - reference)."""

    name = "artifacts"
    needs_reference = False
    higher_is_better = False

    def __init__(self, strides: tuple[int, ...] = DEFAULT_STRIDES, edge_threshold: float = 0.25, **kwargs) -> None:
        super().__init__(**kwargs)
        self.strides = tuple(int(s) for s in strides)
        if not self.strides or min(self.strides) < 2:
            raise ValueError(f"strides must be integers >= 2, got {strides}")
        if not 0.0 < edge_threshold <= 1.0:
            raise ValueError(f"edge_threshold must be in (0, 1], got {edge_threshold}")
        self.edge_threshold = edge_threshold

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return artifact_features(check_images(images), self.strides, self.edge_threshold)

    def score(self, features: Tensor, reference_features: Tensor | None = None) -> dict[str, float]:
        return artifact_score(features, reference_features, self.strides)
