"""Metric plugins for the study tests (importable as ``study_plugins:TinyFrechet`` with tests/ on sys.path): no
weights, deterministic, fast."""

from torch import nn

from qsilk.eval.metrics import FrechetMetric


def TinyFrechet():  # noqa: N802 - a metric factory, named like the class it builds
    """FD and KID on 8x8 average-pooled pixels (3 x 8 x 8 = 192 features at 64 px)."""
    return FrechetMetric(nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten()), fd_key="fd_pool", kid_key="kid_pool")
