"""Frechet distance and KID on network features: standard-Inception FID/KID and the in-domain Fashion-MNIST FD.

The arithmetic is pure functions of (N, D) feature matrices in fp64; the metric objects only choose the network.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..features import frechet_distance
from .base import FeatureMetric, check_images

__all__ = [
    "FrechetReplicates",
    "frechet_distance",
    "ReferenceStats",
    "frechet_distance_to",
    "frechet_distance_gaussians",
    "kid_unbiased",
    "FrechetMetric",
    "InceptionFID",
    "ClassifierFD",
]


def frechet_distance_gaussians(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Closed-form Frechet (2-Wasserstein^2) distance of N(mu1, cov1) and N(mu2, cov2):
    |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^(1/2) cov2 cov1^(1/2))^(1/2)), via symmetric eigendecompositions
    (a different route from :func:`frechet_distance`, which takes the eigenvalues of cov1 @ cov2)."""
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))

    def psd_sqrt(m: Tensor) -> Tensor:
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T

    root1 = psd_sqrt(cov1)
    cross = psd_sqrt(root1 @ cov2 @ root1)
    return float((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross.trace())


class ReferenceStats:
    """Mean, trace and symmetric square root of a reference set's covariance, computed once, so that scoring
    many resampled generated sets (paired bootstrap) costs a Gram matrix and a symmetric eigensolve each."""

    def __init__(self, reference: Tensor) -> None:
        ref = reference.double()
        if ref.ndim != 2 or len(ref) < 2:
            raise ValueError(f"need (N >= 2, D) reference features, got {tuple(ref.shape)}")
        self.mu = ref.mean(0)
        cov = torch.cov(ref.T)
        vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
        self.cov_sqrt = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
        self.trace = float(cov.trace())
        self.dim = ref.shape[1]


def frechet_distance_to(stats: ReferenceStats, features: Tensor) -> float:
    """Frechet distance of ``features`` (n, D) to a reference summarised by :class:`ReferenceStats`.

    tr((S_r^1/2 S_g S_r^1/2)^1/2) = sum of the singular values of B = X_c S_r^1/2 / sqrt(n - 1) (X_c the centred
    features), taken from the smaller of the Gram matrices B B^T (n x n) and B^T B (D x D)."""
    x = features.double()
    if x.ndim != 2 or x.shape[1] != stats.dim:
        raise ValueError(f"need (N, {stats.dim}) features, got {tuple(x.shape)}")
    if len(x) < 2:
        raise ValueError("need at least 2 samples per set for a covariance")
    mu = x.mean(0)
    centred = x - mu
    b = centred @ stats.cov_sqrt / (len(x) - 1) ** 0.5
    gram = b @ b.T if len(x) <= stats.dim else b.T @ b
    cross = torch.linalg.eigvalsh((gram + gram.T) / 2).clamp_min(0).sqrt().sum()
    trace_g = centred.pow(2).sum() / (len(x) - 1)
    return float((mu - stats.mu).pow(2).sum() + stats.trace + trace_g - 2 * cross)


def kid_unbiased(real: Tensor, fake: Tensor, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> float:
    """Unbiased MMD^2 with the polynomial kernel k(x, y) = (gamma x.y + coef)^degree, gamma = 1/D (KID,
    Binkowski et al. 2018), over *all* pairs of the two sets (no random subsets, so it is a deterministic
    function of the features, as paired bootstrap needs). Its expectation is 0 for equal distributions."""
    real, fake = real.double(), fake.double()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need (N, D) feature sets of equal D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    m, n = len(real), len(fake)
    if min(m, n) < 2:
        raise ValueError("KID needs at least 2 samples per set")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    k_rr = (gamma * real @ real.T + coef) ** degree
    k_ff = (gamma * fake @ fake.T + coef) ** degree
    k_rf = (gamma * real @ fake.T + coef) ** degree
    within_r = (k_rr.sum() - k_rr.diagonal().sum()) / (m * (m - 1))
    within_f = (k_ff.sum() - k_ff.diagonal().sum()) / (n * (n - 1))
    return float(within_r + within_f - 2 * k_rf.mean())


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

    def __call__(self, idx) -> dict[str, float]:
        """Scores of ``features[idx]`` (any integer index sequence: a tensor, an array, a list)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
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


class FrechetMetric(FeatureMetric):
    """FD and KID of generated vs reference images on the features of ``network`` ((B, C, H, W) in [0, 1] ->
    (B, D)). ``network`` may be a zero-argument factory, so a heavy network loads on first use only."""

    higher_is_better = False

    def __init__(
        self,
        network: nn.Module | Callable[[], nn.Module],
        fd_key: str = "fd",
        kid_key: str = "kid",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._network = network if isinstance(network, nn.Module) else None
        self._factory = None if isinstance(network, nn.Module) else network
        self.fd_key, self.kid_key = fd_key, kid_key
        self._stats: tuple[Tensor, ReferenceStats] | None = None

    @property
    def network(self) -> nn.Module:
        if self._network is None:
            self._network = self._factory()
        return self._network

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        x = check_images(images)
        net = self.network
        extract = net.features if hasattr(net, "features") and callable(net.features) else net
        return extract(x).detach().to("cpu", torch.float64)

    def score(self, features: Tensor, reference_features: Tensor | None = None) -> dict[str, float]:
        if reference_features is None:
            raise ValueError(f"{type(self).__name__}: the Frechet distance needs reference features")
        # The reference's square root is cached per reference tensor: bootstrap calls score() with one reference.
        if self._stats is None or self._stats[0] is not reference_features:
            self._stats = (reference_features, ReferenceStats(reference_features))
        return {
            self.fd_key: frechet_distance_to(self._stats[1], features),
            self.kid_key: kid_unbiased(reference_features, features),
        }


class InceptionFID(FrechetMetric):
    """Standard FID and (unbiased, all-pairs) KID on the TF-Inception pool features (``qsilk.eval.fid``).

    Keys: ``fid``, ``kid``."""

    name = "inception"

    def __init__(self, network: nn.Module | None = None, **kwargs) -> None:
        def factory() -> nn.Module:
            from ..fid import InceptionFeatures

            return InceptionFeatures()

        super().__init__(network if network is not None else factory, fd_key="fid", kid_key="kid", **kwargs)


class ClassifierFD(FrechetMetric):
    """In-domain Frechet distance and KID on the features of our Fashion-MNIST CNN (``qsilk.eval.classifier``).

    Cheap (a 100k-parameter CNN at 64x64) and sensitive to what the demo model draws. Keys: ``fd_fmnist``,
    ``kid_fmnist``."""

    name = "fmnist"

    def __init__(self, network: nn.Module | None = None, **kwargs) -> None:
        def factory() -> nn.Module:
            from ..classifier import load_fmnist_classifier

            return load_fmnist_classifier()

        super().__init__(network if network is not None else factory, fd_key="fd_fmnist", kid_key="kid_fmnist", **kwargs)
