"""qsilk: micro-clamp and adaptive quantile clipping (AQClip) on the guided x0 of latent diffusion samplers.

Three-line usage with any diffusers pipeline::

    import qsilk
    qsilk.enable(pipe)            # or: with qsilk.enable(pipe): ...
    image = pipe("a photo of a cat").images[0]

The operators in :mod:`qsilk.ops` are pure torch; integrations live in :mod:`qsilk.integrations`.
"""

from qsilk.config import QSilkConfig
from qsilk.ops import aqclip, micro_clamp, structure_confidence
from qsilk.sampling.adapters import UnsupportedSchedulerError
from qsilk.stabilizer import QSilk

__version__ = "0.1.0"


def enable(pipe, config: QSilkConfig | None = None, **kwargs):
    """Patch a diffusers pipeline so every sampler step sees a stabilised x0. See :func:`qsilk.integrations.diffusers.enable`."""
    from qsilk.integrations.diffusers import enable as _enable

    return _enable(pipe, config, **kwargs)


def disable(pipe) -> None:
    """Remove the patch installed by :func:`enable`, restoring the pipeline exactly."""
    from qsilk.integrations.diffusers import disable as _disable

    _disable(pipe)


__all__ = [
    "QSilk",
    "QSilkConfig",
    "UnsupportedSchedulerError",
    "__version__",
    "aqclip",
    "disable",
    "enable",
    "micro_clamp",
    "structure_confidence",
]
