"""QSilk variants that need the conditional prediction, as guiders (the ``diffusers.guiders`` protocol).

QSilk's hook (:mod:`qsilk.integrations.diffusers`) sees only the guided x0. A corridor sized by the *conditional*
x0's per-tile spread needs both predictions, which only the guider has, so it is a guider wrapper:

    guider = ConditionalCorridorGuidance(guidance_scale=6.0)           # plain CFG, then the corridor
    guider = ConditionalCorridorGuidance(guider=AdaptiveProjectedGuidance(6.0))  # any guider, then the corridor
    images = demo_pipe(class_labels, guider=guider).images

It works on x0 predictions (``prediction_space = "x0"``), like the other x0-space guiders of :mod:`qsilk.baselines`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from qsilk.baselines import X0OperatorGuidance
from qsilk.ops import apply_corridor, conditional_corridor, resolve_tile


class ConditionalCorridorGuidance(X0OperatorGuidance):
    """``guider`` (default: plain CFG at ``guidance_scale``), then the guided x0 soft-clipped into the corridor
    ``tile mean(guided) +- k * tile std(cond)`` (:func:`qsilk.ops.conditional_corridor`) at every step.

    ``k`` is one number (uniform confidence); ``tile`` / ``stride`` accept ``"auto"`` (scaled to the latent).
    Steps without an unconditional prediction (CFG 1, outside a guidance interval) are left untouched: there is no
    extrapolation to tame. ``window`` = (start, stop) fractions of the steps where the corridor acts."""

    def __init__(
        self,
        guider=None,
        guidance_scale: float | None = None,
        k: float = 2.5,
        tile: int | str = "auto",
        stride: int | str = "auto",
        softness: float = 0.25,
        window: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__(None, guider=guider, guidance_scale=guidance_scale)
        if not k > 0:
            raise ValueError(f"k must be > 0, got {k!r}")
        if softness < 0:
            raise ValueError(f"softness must be >= 0, got {softness!r}")
        start, stop = window
        if not 0.0 <= start < stop <= 1.0:
            raise ValueError(f"window must be 0 <= start < stop <= 1, got {window!r}")
        self.k, self.tile, self.stride = float(k), tile, stride
        self.softness, self.window = float(softness), (float(start), float(stop))

    def _active(self) -> bool:
        if self._step is None or not self._num_inference_steps:
            return True
        progress = self._step / self._num_inference_steps
        return self.window[0] <= progress < self.window[1]

    def operate(self, guided: Tensor, pred_cond: Tensor, pred_uncond: Tensor | None) -> Tensor:
        if pred_uncond is None or not self._active():
            return guided
        tile, stride = resolve_tile(self.tile, self.stride, *guided.shape[-2:])
        centre, half = conditional_corridor(guided, pred_cond, None, tile, stride, self.k, self.k)
        return apply_corridor(guided, centre, half, self.softness)

    def to_dict(self) -> dict[str, Any]:
        inner = self.guider.to_dict() if hasattr(self.guider, "to_dict") else {"class": type(self.guider).__name__}
        return {
            "class": type(self).__name__,
            "guider": inner,
            "k": self.k,
            "tile": self.tile,
            "stride": self.stride,
            "softness": self.softness,
            "window": list(self.window),
        }


__all__ = ["ConditionalCorridorGuidance"]
