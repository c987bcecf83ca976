"""Baselines QSilk is measured against, where diffusers has no ready-made piece.

diffusers ships the guiders (``diffusers.guiders``: CFG with rescale and guidance interval, APG, CFG-Zero*, FDG,
TCFG) and Imagen dynamic thresholding (a scheduler's ``thresholding=True``); those are used as they are. This
module adds what it lacks, in the same guider protocol so the demo pipeline (and the study) call everything alike:

- :func:`mimic_scale_threshold`: latent "mimic scale" dynamic thresholding (the sd-dynamic-thresholding idea),
  a pure function on the conditional / unconditional x0 predictions, and :class:`MimicScaleGuidance`.
- :class:`X0OperatorGuidance`: any guider followed by an x0 -> x0 operator at every step (used for the reference
  QSilk formulas of :mod:`qsilk.eval.reference`, which are comparisons, not samplers of their own).
- :func:`imagen_thresholding`: a copy of a scheduler with its own Imagen thresholding switched on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def mimic_scale_threshold(
    x0_cond: Tensor,
    x0_uncond: Tensor,
    guidance_scale: float,
    mimic_scale: float,
    percentile: float = 0.995,
    phi: float = 1.0,
) -> Tensor:
    """Guided x0 at ``guidance_scale`` with its per-channel range brought back to that of ``mimic_scale``.

    Per sample and channel: both guided predictions (real scale and mimic scale) are centred on their mean; the
    real one is clamped at ``s = max(Q_percentile(|centred real|), max |centred mimic|)`` and rescaled by
    ``max |centred mimic| / s``, so its extremes land on the mimic prediction's; the mean is added back, and the
    result is mixed with the plain guided x0 by ``phi`` (1 = fully thresholded).
    """
    if x0_cond.shape != x0_uncond.shape or x0_cond.ndim < 3:
        raise ValueError(f"need equal (B, C, ...) predictions, got {tuple(x0_cond.shape)}, {tuple(x0_uncond.shape)}")
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be in (0, 1], got {percentile!r}")
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"phi must be in [0, 1], got {phi!r}")
    dtype = x0_cond.dtype
    cond, uncond = x0_cond.float(), x0_uncond.float()
    diff = cond - uncond
    real = (uncond + guidance_scale * diff).flatten(2)
    mimic = (uncond + mimic_scale * diff).flatten(2)
    real_mean = real.mean(2, keepdim=True)
    real_centred = real - real_mean
    mimic_centred = mimic - mimic.mean(2, keepdim=True)
    mimic_max = mimic_centred.abs().amax(2, keepdim=True)
    real_max = torch.quantile(real_centred.abs(), percentile, dim=2, keepdim=True)
    limit = torch.maximum(real_max, mimic_max).clamp_min(torch.finfo(torch.float32).tiny)
    thresholded = real_centred.clamp(-limit, limit) / limit * mimic_max
    out = phi * thresholded + (1.0 - phi) * real_centred + real_mean
    return out.unflatten(2, x0_cond.shape[2:]).to(dtype)


class _GuiderState:
    """Step bookkeeping shared by the guiders below (the ``diffusers.guiders`` protocol)."""

    _input_predictions = ["pred_cond", "pred_uncond"]

    def __init__(self) -> None:
        self._step: int | None = None
        self._num_inference_steps: int | None = None
        self._timestep = None

    def set_state(self, step: int, num_inference_steps: int, timestep: Any) -> None:
        self._step, self._num_inference_steps, self._timestep = step, num_inference_steps, timestep


class MimicScaleGuidance(_GuiderState):
    """Latent dynamic thresholding as a guider working on x0 predictions (``prediction_space = "x0"``)."""

    prediction_space = "x0"

    def __init__(self, guidance_scale: float, mimic_scale: float = 3.0, percentile: float = 0.995, phi: float = 1.0):
        super().__init__()
        if mimic_scale > guidance_scale:
            mimic_scale = guidance_scale  # nothing to tame below the mimic scale
        self.guidance_scale, self.mimic_scale = float(guidance_scale), float(mimic_scale)
        self.percentile, self.phi = float(percentile), float(phi)

    @property
    def num_conditions(self) -> int:
        return 2 if self.guidance_scale != 1.0 else 1

    def forward(self, pred_cond: Tensor, pred_uncond: Tensor | None = None) -> Tensor:
        if pred_uncond is None:
            return pred_cond
        return mimic_scale_threshold(
            pred_cond, pred_uncond, self.guidance_scale, self.mimic_scale, self.percentile, self.phi
        )

    def to_dict(self) -> dict:
        return {
            "class": type(self).__name__,
            "guidance_scale": self.guidance_scale,
            "mimic_scale": self.mimic_scale,
            "percentile": self.percentile,
            "phi": self.phi,
        }


class X0OperatorGuidance(_GuiderState):
    """``guider`` (default: plain CFG at ``guidance_scale``), then ``operator(x0)`` on the guided x0 at every step.

    Works in x0 space (``prediction_space = "x0"``); the inner guider sees x0 predictions too (CFG is linear, so
    plain CFG gives the same x0 as on the model output, up to float rounding).
    """

    prediction_space = "x0"

    def __init__(self, operator: Callable[[Tensor], Tensor] | None, guider=None, guidance_scale: float | None = None):
        super().__init__()
        if guider is None:
            if guidance_scale is None:
                raise ValueError("give a guider or a guidance_scale")
            from diffusers.guiders import ClassifierFreeGuidance

            guider = ClassifierFreeGuidance(guidance_scale=guidance_scale)
        self.operator = operator
        self.guider = guider

    def set_state(self, step: int, num_inference_steps: int, timestep: Any) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self.guider.set_state(step=step, num_inference_steps=num_inference_steps, timestep=timestep)

    def prepare_inputs(self, data: dict) -> Any:
        if hasattr(self.guider, "prepare_inputs"):
            return self.guider.prepare_inputs(data)
        return None

    @property
    def num_conditions(self) -> int:
        return self.guider.num_conditions

    def forward(self, pred_cond: Tensor, pred_uncond: Tensor | None = None) -> Tensor:
        result = self.guider.forward(pred_cond, pred_uncond)
        guided = result.pred if hasattr(result, "pred") else result
        return self.operate(guided, pred_cond, pred_uncond)

    def operate(self, guided: Tensor, pred_cond: Tensor, pred_uncond: Tensor | None) -> Tensor:
        """The x0 step after guidance: ``operator(guided)``. A subclass that needs the branches overrides this
        (and passes ``operator=None``)."""
        return self.operator(guided)


def imagen_thresholding(scheduler, ratio: float = 0.995, max_value: float = 1e4):
    """A new scheduler like ``scheduler`` with its own Imagen dynamic thresholding on (s = max(1, Q_ratio(|x0|)),
    x0 <- clamp(x0, -s, s) / s per sample); ``max_value`` caps s (diffusers' ``sample_max_value``; large = the
    Imagen formula). Raises ValueError for schedulers without it (Euler, FlowMatch ...)."""
    if "thresholding" not in scheduler.config:
        raise ValueError(f"{type(scheduler).__name__} has no Imagen thresholding (thresholding=True)")
    return type(scheduler).from_config(
        scheduler.config, thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value
    )


__all__ = ["MimicScaleGuidance", "X0OperatorGuidance", "imagen_thresholding", "mimic_scale_threshold"]
