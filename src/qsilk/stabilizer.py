"""``QSilk``: the configured operators as one callable, x0 in, x0 out, with per-step windows, corridor EMA and
statistics of what it did."""

from __future__ import annotations

import torch

from qsilk.config import QSilkConfig
from qsilk.ops import apply_corridor, aqclip_corridor, micro_clamp, resize_confidence, structure_confidence
from qsilk.ops._checks import check_latent


def schedule_progress(step: int | None, num_steps: int | None, progress: float | None) -> float | None:
    """Position in the schedule in [0, 1]: explicit ``progress``, else ``step / (num_steps - 1)``, else None."""
    if progress is not None:
        return float(progress)
    if step is not None and num_steps is not None:
        return step / max(num_steps - 1, 1)
    return None


def _in_window(window: tuple[float, float], progress: float | None) -> bool:
    return progress is None or window[0] <= progress <= window[1]


class QSilk:
    """Micro-clamp then AQClip on a (B, C, H, W) x0 prediction, as configured.

    >>> stab = QSilk(QSilkConfig())
    >>> x0 = stab(x0, step=3, num_steps=20)
    """

    def __init__(self, config: QSilkConfig | None = None):
        self.config = config if config is not None else QSilkConfig()
        self.last_stats: dict = {}
        self.last_confidence: torch.Tensor | None = None
        self._corridor: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> None:
        """Forget the corridor EMA (call when a new sampling run starts)."""
        self._corridor = None
        self.last_confidence = None
        self.last_stats = {}

    def is_active(self, progress: float | None = None) -> bool:
        cfg = self.config
        return (cfg.clamp and _in_window(cfg.clamp_window, progress)) or (
            cfg.aqclip and _in_window(cfg.aqclip_window, progress)
        )

    def confidence_map(self, x0: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor | None:
        """The AQClip confidence for ``x0``: the caller's map if given, else the configured source
        ("attention" without a caller-supplied map falls back to the structure proxy)."""
        if confidence is not None:
            return resize_confidence(confidence, x0)
        if self.config.confidence is None:
            return None
        return structure_confidence(x0)

    def __call__(
        self,
        x0: torch.Tensor,
        sigma: float | None = None,
        step: int | None = None,
        num_steps: int | None = None,
        progress: float | None = None,
        confidence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        p = schedule_progress(step, num_steps, progress)
        clamp_on = cfg.clamp and _in_window(cfg.clamp_window, p)
        aqclip_on = cfg.aqclip and _in_window(cfg.aqclip_window, p)
        self.last_confidence = None
        if not (clamp_on or aqclip_on):
            self.last_stats = self._stats(x0, x0, x0, False, False, None)
            return x0
        check_latent(x0, min_dim=4)
        clamped = (
            micro_clamp(x0, cfg.clamp_quantile, cfg.clamp_mode, cfg.clamp_per_channel, cfg.clamp_softness)
            if clamp_on
            else x0
        )
        out, conf = clamped, None
        if aqclip_on:
            conf = self.confidence_map(clamped, confidence)
            centre, half = aqclip_corridor(
                clamped, conf, cfg.aqclip_tile, cfg.aqclip_stride, cfg.aqclip_k_min, cfg.aqclip_k_max
            )
            if cfg.ema > 0 and self._corridor is not None and self._corridor[0].shape == centre.shape:
                prev_centre, prev_half = self._corridor
                centre = cfg.ema * prev_centre + (1 - cfg.ema) * centre
                half = cfg.ema * prev_half + (1 - cfg.ema) * half
            self._corridor = (centre, half)
            out = apply_corridor(clamped, centre, half, cfg.aqclip_softness)
        self.last_confidence = conf
        self.last_stats = self._stats(x0, clamped, out, clamp_on, aqclip_on, conf)
        return out

    @staticmethod
    def _stats(x0, clamped, out, clamp_on: bool, aqclip_on: bool, conf) -> dict:
        n = x0.numel()
        clamp_changed = clamped.ne(x0) if clamp_on else None
        aq_changed = out.ne(clamped) if aqclip_on else None
        touched = out.ne(x0) if (clamp_on or aqclip_on) else None
        return {
            "clamp_fraction": float(clamp_changed.sum()) / n if clamp_changed is not None else 0.0,
            "aqclip_fraction": float(aq_changed.sum()) / n if aq_changed is not None else 0.0,
            "touched_fraction": float(touched.sum()) / n if touched is not None else 0.0,
            "max_abs_before": float(x0.detach().abs().max()),
            "max_abs_after": float(out.detach().abs().max()),
            "clamp_active": bool(clamp_on),
            "aqclip_active": bool(aqclip_on),
            "confidence_mean": float(conf.mean()) if conf is not None else None,
        }
