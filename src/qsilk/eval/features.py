"""FID and KID from feature matrices (so features can be cached, resumed and reused across tables)."""

from __future__ import annotations

import torch


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two (N, D) feature sets: |mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)), in fp64.

    The trace of the matrix square root is the sum of the square roots of the eigenvalues of S_r S_f (the same
    route as torchmetrics), which avoids an explicit sqrtm."""
    real, fake = real.double(), fake.double()
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"need (N, D) feature sets of equal D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if min(len(real), len(fake)) < 2:
        raise ValueError("need at least 2 samples per set for a covariance")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)
    eig = torch.linalg.eigvals(cov_r @ cov_f).sqrt().real.sum()
    return float((mu_r - mu_f).pow(2).sum() + cov_r.trace() + cov_f.trace() - 2 * eig)


def kernel_inception_distance(
    real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int = 500, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std over random subsets) with the cubic polynomial kernel of Binkowski et al."""
    from torchmetrics.image.kid import poly_mmd

    size = min(subset_size, len(real), len(fake))
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        r = real[torch.randperm(len(real), generator=g)[:size]].double()
        f = fake[torch.randperm(len(fake), generator=g)[:size]].double()
        values.append(poly_mmd(r, f))
    v = torch.stack(values)
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0
