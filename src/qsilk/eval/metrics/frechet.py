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
    "frechet_distance",
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
        return {
            self.fd_key: frechet_distance(reference_features, features),
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
