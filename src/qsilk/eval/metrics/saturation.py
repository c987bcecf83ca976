"""Saturation: how much of an image sits at the ends of the range, and how bright its brightest details are.

Per image (grey): the fraction of pixels that an 8-bit export turns into 0 (``<= 0.5/255``) or 255
(``>= 254.5/255``), and the 99.9th-percentile brightness (``peak``, to see highlights dimmed or blown).
Score: set means, and with a reference the differences (generated - reference), since Fashion-MNIST itself has a
black background (``saturation_low`` of real images is large, not a defect).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FeatureMetric, check_images, to_grey

LOW, HIGH = 0.5 / 255, 254.5 / 255
FEATURES = ("saturation_low", "saturation_high", "peak")


def saturation_features(images: Tensor, low: float = LOW, high: float = HIGH, peak_quantile: float = 0.999) -> Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 3): fraction <= low, fraction >= high, the peak_quantile brightness."""
    x = to_grey(images).flatten(1).double()
    return torch.stack(
        [(x <= low).double().mean(1), (x >= high).double().mean(1), torch.quantile(x, peak_quantile, dim=1)], 1
    )


def saturation_score(features: Tensor, reference_features: Tensor | None = None) -> dict[str, float]:
    if features.ndim != 2 or features.shape[1] != len(FEATURES):
        raise ValueError(f"saturation features must be (N, {len(FEATURES)}), got {tuple(features.shape)}")
    mean = features.double().mean(0)
    out = {name: float(v) for name, v in zip(FEATURES, mean, strict=True)}
    out["saturation"] = out["saturation_low"] + out["saturation_high"]
    if reference_features is not None:
        ref = saturation_score(reference_features)
        for key in (*FEATURES, "saturation"):
            out[f"{key}_delta"] = out[key] - ref[key]
    return out


class Saturation(FeatureMetric):
    """Keys: ``saturation_low``, ``saturation_high``, ``saturation`` (their sum), ``peak``; with a reference also
    ``*_delta`` (generated - reference)."""

    name = "saturation"
    needs_reference = False

    def __init__(self, low: float = LOW, high: float = HIGH, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
        self.low, self.high = low, high

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return saturation_features(check_images(images), self.low, self.high)

    def score(self, features: Tensor, reference_features: Tensor | None = None) -> dict[str, float]:
        return saturation_score(features, reference_features)
