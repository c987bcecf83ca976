"""qsilk metrics: torchmetrics-style objects over images in [0, 1], shape (B, C, H, W).

Every metric has ``update(images, real=False)`` / ``compute() -> dict[str, float]`` / ``reset()``, and for paired
bootstrap the per-sample ``features(images) -> (B, D)`` (CPU fp64) and the pure ``score(features,
reference_features) -> dict[str, float]``. See ``docs/metrics.md`` for definitions and units.

========================  ===============  ==========================================================
metric (``name``)         needs reference  keys
========================  ===============  ==========================================================
InceptionFID (inception)  yes              fid, kid
ClassifierFD (fmnist)     yes              fd_fmnist, kid_fmnist
SpectralFidelity          yes              spectral_rms, spectral_rms_hf, spectral_hf_gap, spectral_mf_gap
Saturation                no               saturation_low/high, saturation, peak (+ *_delta)
ArtifactEnergy            no               harmonic_s4, harmonic_s8, halo_rms, edge_band_fraction (+ *_delta)
========================  ===============  ==========================================================
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from .artifacts import ArtifactEnergy, artifact_features, artifact_score, halo_terms, harmonic_energy
from .base import FeatureMetric, check_images
from .frechet import (
    ClassifierFD,
    FrechetMetric,
    FrechetReplicates,
    InceptionFID,
    ReferenceStats,
    frechet_distance,
    frechet_distance_gaussians,
    frechet_distance_to,
    kid_unbiased,
)
from .saturation import Saturation, saturation_features, saturation_score
from .spectral import SpectralFidelity, radial_log_spectrum, spectral_score

METRICS: dict[str, type[FeatureMetric]] = {
    cls.name: cls for cls in (InceptionFID, ClassifierFD, SpectralFidelity, Saturation, ArtifactEnergy)
}
#: cheap metrics (no Inception): what a quick study iteration uses
FAST_METRICS = ("fmnist", "spectral", "saturation", "artifacts")


def make_metrics(names: Iterable[str] = tuple(METRICS)) -> dict[str, FeatureMetric]:
    """Fresh metric objects by name (see ``METRICS``); an unknown name is a clear error."""
    names = list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {sorted(METRICS)}")
    return {n: METRICS[n]() for n in names}


def compute_features(metrics: dict[str, FeatureMetric], images: Tensor) -> dict[str, Tensor]:
    """Per-sample features of every metric for one image batch (validated once)."""
    images = check_images(images)
    return {name: m.features(images) for name, m in metrics.items()}


def score_all(
    metrics: dict[str, FeatureMetric],
    features: dict[str, Tensor],
    reference_features: dict[str, Tensor | None] | None = None,
) -> dict[str, float]:
    """Merge every metric's ``score`` into one flat dict (keys are unique across metrics)."""
    reference_features = reference_features or {}
    out: dict[str, float] = {}
    for name, m in metrics.items():
        out.update(m.score(features[name], reference_features.get(name)))
    return out


__all__ = [
    "METRICS",
    "FAST_METRICS",
    "make_metrics",
    "compute_features",
    "score_all",
    "FeatureMetric",
    "FrechetMetric",
    "InceptionFID",
    "ClassifierFD",
    "SpectralFidelity",
    "Saturation",
    "ArtifactEnergy",
    "check_images",
    "FrechetReplicates",
    "frechet_distance",
    "frechet_distance_to",
    "ReferenceStats",
    "frechet_distance_gaussians",
    "kid_unbiased",
    "radial_log_spectrum",
    "spectral_score",
    "saturation_features",
    "saturation_score",
    "artifact_features",
    "artifact_score",
    "harmonic_energy",
    "halo_terms",
]
