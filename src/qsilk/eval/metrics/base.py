"""The metric interface every qsilk metric follows (torchmetrics ``Metric`` underneath).

A metric is two pure pieces and an accumulator around them:

* ``features(images) -> (B, D)``: per-sample features, float64 on the CPU. Images are float tensors in [0, 1],
  shape (B, C, H, W) (grey or RGB; RGB is averaged to grey by the image-statistics metrics).
* ``score(features, reference_features) -> dict[str, float]``: a pure function of two feature sets, so a study can
  resample seeds (paired bootstrap) without touching images again. Metrics that need no reference (saturation,
  artifacts) accept ``reference_features=None`` and then report the generated set alone.
* ``update(images, real=False)`` / ``compute()`` / ``reset()``: accumulate generated (or, with ``real=True``,
  reference) features and score them. ``reset()`` keeps the reference unless ``reset(reference=True)``.
  ``set_reference_features(features)`` installs cached reference features directly.

States are lists concatenated across processes (``dist_reduce_fx="cat"``), so the metric also gathers correctly
under torch.distributed / accelerate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def check_images(images: Tensor) -> Tensor:
    """Validate (B, C, H, W) images in [0, 1] (uint8 accepted) and return them as float32."""
    if not isinstance(images, Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("expected at least one image, got an empty batch")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"expected images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return x.clamp(0.0, 1.0)


def to_grey(images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H, W): the channel mean (grey stays grey; RGB of equal channels is exact)."""
    return images.mean(1)


class FeatureMetric(Metric):
    """Base class: subclasses implement :meth:`features` and :meth:`score` (both pure)."""

    full_state_update = False
    #: whether :meth:`score` needs reference features (FID-like) or can run without them
    needs_reference = True
    #: short name used by the study (``metrics.make_metrics``)
    name = "metric"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("generated", default=[], dist_reduce_fx="cat")
        self.add_state("reference", default=[], dist_reduce_fx="cat")

    # -- the two pure pieces ------------------------------------------------------------------------------------
    def features(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, features: Tensor, reference_features: Tensor | None = None) -> dict[str, float]:
        raise NotImplementedError  # pragma: no cover - abstract

    # -- the accumulator ----------------------------------------------------------------------------------------
    def update(self, images: Tensor, real: bool = False) -> None:
        feats = self.features(images)
        (self.reference if real else self.generated).append(feats)

    def set_reference_features(self, features: Tensor) -> None:
        """Use precomputed reference features (e.g. cached across runs) instead of ``update(real=True)``."""
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"reference features must be (N, D) with N >= 1, got {tuple(features.shape)}")
        self.reference = [features.detach().to("cpu", torch.float64)]

    def reference_features(self) -> Tensor | None:
        return dim_zero_cat(self.reference) if len(self.reference) else None

    def generated_features(self) -> Tensor:
        if not len(self.generated):
            raise ValueError(f"{type(self).__name__}: no generated images; call update(images) first")
        return dim_zero_cat(self.generated)

    def compute(self) -> dict[str, float]:
        reference = self.reference_features()
        if reference is None and self.needs_reference:
            raise ValueError(
                f"{type(self).__name__} needs reference images: call update(images, real=True) "
                "or set_reference_features(features) first"
            )
        return self.score(self.generated_features(), reference)

    def reset(self, reference: bool = False) -> None:
        """Forget the generated features; the reference too only with ``reference=True``."""
        kept = list(self.reference)
        super().reset()
        if not reference:
            self.reference = kept
