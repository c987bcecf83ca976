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


def bootstrap_indices(n: int, replicates: int, seed: int = 0) -> np.ndarray:
    """(replicates, n) indices drawn with replacement; a pure function of (n, replicates, seed)."""
    if n < 2 or replicates < 1:
        raise ValueError(f"need n >= 2 samples and >= 1 replicate, got n={n}, replicates={replicates}")
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def _psd_sqrt(matrix: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


class FrechetReplicates:
    """FD (``fd_key``) and all-pairs unbiased KID (``kid_key``, cubic polynomial kernel, gamma = 1/D) of
    ``features[idx]`` against a fixed reference, for many ``idx``.

    FD: tr sqrt(S_r S_x) = tr sqrt(S_r^1/2 S_x S_r^1/2) = sum of sqrt of the eigenvalues of Yc Yc^T / (n - 1),
    Yc = centred rows of X S_r^1/2: a resample only re-indexes and re-centres a precomputed Gram matrix.
    KID: the generated-generated and reference-generated kernel sums are re-indexed the same way; the
    reference-reference term is a constant, summed in blocks (a 10k reference never builds a 10k x 10k matrix).
    """

    def __init__(
        self,
        features: Tensor,
        reference: Tensor,
        fd_key: str = "fd",
        kid_key: str | None = "kid",
        block: int = 2048,
    ) -> None:
        x, r = features.double(), reference.double()
        if x.ndim != 2 or r.ndim != 2 or x.shape[1] != r.shape[1]:
            raise ValueError(f"need (N, D) features of equal D, got {tuple(x.shape)} and {tuple(r.shape)}")
        self.fd_key, self.kid_key = fd_key, kid_key
        n, d = x.shape
        self.n, self.dim = n, d
        self.mu_r = r.mean(0)
        cov_r = torch.cov(r.T)
        self.trace_r = float(cov_r.trace())
        root = _psd_sqrt(cov_r)
        self.x = x
        self.y = x @ root
        self.small_n = n <= d
        self.gram_y = self.y @ self.y.T if self.small_n else None
        if kid_key is not None:
            gamma = 1.0 / d
            self.k_xx = (gamma * x @ x.T + 1.0) ** 3
            self.k_rx_mean = torch.zeros(n, dtype=torch.float64)  # mean over reference rows of k(r, x_j)
            within_r, m = 0.0, len(r)
            for start in range(0, m, block):
                rows = r[start : start + block]
                self.k_rx_mean += ((gamma * rows @ x.T + 1.0) ** 3).sum(0)
                for other in range(0, m, block):
                    k = (gamma * rows @ r[other : other + block].T + 1.0) ** 3
                    within_r += float(k.sum())
                    if other == start:
                        within_r -= float(k.diagonal().sum())
            self.k_rx_mean /= m
            self.within_r = within_r / (m * (m - 1))

    def __call__(self, idx: np.ndarray | Tensor) -> dict[str, float]:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        n = len(idx)
        xb = self.x[idx]
        mean = xb.mean(0)
        trace_x = float((xb - mean).pow(2).sum()) / (n - 1)
        if self.small_n:
            k = self.gram_y[idx][:, idx]
            k = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
            eig = torch.linalg.eigvalsh((k + k.T) / 2 / (n - 1))
        else:
            yb = self.y[idx]
            eig = torch.linalg.eigvalsh(torch.cov(yb.T))
        cross = float(eig.clamp_min(0).sqrt().sum())
        out = {self.fd_key: float((self.mu_r - mean).pow(2).sum()) + self.trace_r + trace_x - 2 * cross}
        if self.kid_key is not None:
            kb = self.k_xx[idx][:, idx]
            within_x = float(kb.sum() - kb.diagonal().sum()) / (n * (n - 1))
            out[self.kid_key] = self.within_r + within_x - 2 * float(self.k_rx_mean[idx].mean())
        return out


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
