"""Paired bootstrap over seeds: the same resampled seed indices for every method of a cell group, so the difference
of a metric between a method and plain CFG carries the seed-to-seed noise once, not twice.

A metric's ``score(features, reference)`` is a pure function of per-sample features, so one replicate is
``score(features[idx], reference)``. For Frechet-type metrics (FD + KID, 2048-D Inception features) that is
seconds per call; :class:`FrechetReplicates` computes the same numbers from per-cell Gram matrices in
O(n^2) + one n x n (or D x D) symmetric eigenvalue problem per replicate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from qsilk.eval.metrics.frechet import FrechetReplicates


def bootstrap_indices(n: int, replicates: int, seed: int = 0) -> np.ndarray:
    """(replicates, n) indices drawn with replacement; a pure function of (n, replicates, seed)."""
    if n < 2 or replicates < 1:
        raise ValueError(f"need n >= 2 samples and >= 1 replicate, got n={n}, replicates={replicates}")
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def replicate_scorer(metric, features: Tensor, reference: Tensor | None) -> Callable[[np.ndarray], dict[str, float]]:
    """idx -> the metric's scores on ``features[idx]``: the fast Frechet route for ``FrechetMetric``-like metrics
    (they have ``fd_key``/``kid_key``), else the metric's own pure ``score``."""
    if reference is not None and hasattr(metric, "fd_key") and hasattr(metric, "kid_key"):
        return FrechetReplicates(features, reference, metric.fd_key, metric.kid_key)
    return lambda idx: metric.score(features[torch.as_tensor(np.asarray(idx), dtype=torch.long)], reference)


def replicate_table(scorer: Callable[[np.ndarray], dict[str, float]], indices: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of every replicate: key -> (replicates,) float64."""
    rows = [scorer(idx) for idx in indices]
    return {key: np.array([row[key] for row in rows], dtype=np.float64) for key in rows[0]}


def paired_interval(method: np.ndarray, baseline: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the paired replicate differences (method - baseline)."""
    diff = np.asarray(method, np.float64) - np.asarray(baseline, np.float64)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(diff, [tail, 100 - tail])
    return float(lo), float(hi)


__all__ = ["FrechetReplicates", "bootstrap_indices", "paired_interval", "replicate_scorer", "replicate_table"]
