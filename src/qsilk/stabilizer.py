"""``QSilk``: the configured operators as one callable, x0 in, x0 out, with per-step windows, corridor EMA and
statistics of what it did."""

from __future__ import annotations

import math
import warnings

import torch

from qsilk.config import QSilkConfig
from qsilk.ops import (
    apply_corridor,
    aqclip_corridor,
    edge_gate,
    micro_clamp,
    resize_confidence,
    resolve_tile,
    restore_high_frequencies,
    structure_confidence,
)
from qsilk.ops._checks import check_latent

STAT_KEYS = (
    "clamp_fraction",
    "aqclip_fraction",
    "touched_fraction",
    "max_abs_before",
    "max_abs_after",
    "clamp_active",
    "aqclip_active",
    "confidence_mean",
)


def schedule_progress(step: int | None, num_steps: int | None, progress: float | None) -> float | None:
    """Position in the schedule in [0, 1]: explicit ``progress``, else ``step / (num_steps - 1)``, else None."""
    if progress is not None:
        value = float(progress)
    elif step is not None and num_steps is not None:
        if num_steps < 1 or step < 0:
            raise ValueError(f"need step >= 0 and num_steps >= 1, got step={step}, num_steps={num_steps}")
        value = step / max(num_steps - 1, 1)
    else:
        return None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"schedule progress must be in [0, 1] (0 = first step, 1 = last), got {value!r}")
    return value


def _in_window(window: tuple[float, float], progress: float | None) -> bool:
    return progress is None or window[0] <= progress <= window[1]


class StepStats:
    """What one QSilk call did, kept on the tensors' device until read: reading is one device-to-host copy, and
    :meth:`to_dicts` reads many calls' statistics with one copy per device."""

    __slots__ = ("_counts", "_values", "_numel", "clamp_active", "aqclip_active", "_dict")

    def __init__(self, counts, values, numel: int, clamp_active: bool, aqclip_active: bool):
        self._counts = counts  # int64 (3,): elements changed by the clamp, by AQClip, by either
        self._values = values  # fp32 (3,): max|x0| before, after, confidence mean (NaN: no confidence map)
        self._numel = numel
        self.clamp_active = clamp_active
        self.aqclip_active = aqclip_active
        self._dict: dict | None = None

    def _build(self, counts: list[int], values: list[float]) -> dict:
        n = self._numel
        return {
            "clamp_fraction": counts[0] / n,
            "aqclip_fraction": counts[1] / n,
            "touched_fraction": counts[2] / n,
            "max_abs_before": values[0],
            "max_abs_after": values[1],
            "clamp_active": self.clamp_active,
            "aqclip_active": self.aqclip_active,
            "confidence_mean": None if math.isnan(values[2]) else values[2],
        }

    def to_dict(self) -> dict:
        """The statistics as JSON-safe Python values (keys: :data:`STAT_KEYS`)."""
        if self._dict is None:
            self._dict = self._build(self._counts.tolist(), self._values.tolist())
            self._counts = self._values = None  # release the device tensors
        return dict(self._dict)

    @staticmethod
    def to_dicts(items: list[StepStats]) -> list[dict]:
        """``[s.to_dict() for s in items]`` with one transfer per device instead of two per item."""
        pending: dict[torch.device, list[StepStats]] = {}
        for item in items:
            if item._dict is None:
                pending.setdefault(item._counts.device, []).append(item)
        for group in pending.values():
            counts = torch.stack([g._counts for g in group]).tolist()
            values = torch.stack([g._values for g in group]).tolist()
            for item, c, v in zip(group, counts, values, strict=True):
                item._dict = item._build(c, v)
                item._counts = item._values = None
        return [item.to_dict() for item in items]


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of elements where ``a`` and ``b`` differ, as a device tensor (0 without work when a is b)."""
    if a is b:
        return torch.zeros((), dtype=torch.int64, device=a.device)
    return torch.count_nonzero(a.ne(b))


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return torch.full((), float("nan"), device=x.device)
    low, high = torch.aminmax(x.detach())  # no |x| temporary
    return torch.maximum(-low.float(), high.float())


def step_stats(
    x0: torch.Tensor,
    clamped: torch.Tensor,
    out: torch.Tensor,
    clamp_on: bool,
    aqclip_on: bool,
    confidence: torch.Tensor | None,
) -> StepStats:
    """Statistics of one call, computed on the device without synchronising (see :class:`StepStats`)."""
    clamp_count = _changed(clamped, x0)
    aq_count = _changed(out, clamped)
    # at most one operator changed anything: no third comparison
    touched = clamp_count + aq_count if clamped is x0 or out is clamped else _changed(out, x0)
    before = _max_abs(x0)
    after = before if out is x0 else _max_abs(out)
    conf_mean = (
        confidence.float().mean()
        if confidence is not None
        else torch.full((), float("nan"), device=x0.device)
    )
    return StepStats(
        torch.stack([clamp_count, aq_count, touched]),
        torch.stack([before, after, conf_mean.to(before.device)]),
        x0.numel(),
        clamp_on,
        aqclip_on,
    )


class QSilk:
    """Micro-clamp then AQClip on a (B, C, H, W) x0 prediction, as configured.

    >>> stab = QSilk(QSilkConfig())
    >>> x0 = stab(x0, step=3, num_steps=20)

    ``collect_stats=False`` skips the per-call statistics entirely (``last_stats`` stays empty).
    """

    def __init__(self, config: QSilkConfig | None = None, *, collect_stats: bool = True):
        self.config = config if config is not None else QSilkConfig()
        self.collect_stats = collect_stats
        self.last_step_stats: StepStats | None = None
        self.last_confidence: torch.Tensor | None = None
        self._corridor: tuple[torch.Tensor, torch.Tensor] | None = None
        self._warned_no_position = False

    @property
    def last_stats(self) -> dict:
        """Statistics of the last call (keys :data:`STAT_KEYS`, Python values); reading them synchronises with
        the device once. Empty before the first call, after :meth:`reset` and with ``collect_stats=False``."""
        return self.last_step_stats.to_dict() if self.last_step_stats is not None else {}

    def reset(self) -> None:
        """Forget the corridor EMA (call when a new sampling run starts)."""
        self._corridor = None
        self.last_confidence = None
        self.last_step_stats = None

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

    def _warn_windows_unusable(self) -> None:
        cfg = self.config
        partial = [
            name
            for name, on, window in (
                ("clamp_window", cfg.clamp, cfg.clamp_window),
                ("aqclip_window", cfg.aqclip, cfg.aqclip_window),
                ("hf_restore_window", cfg.hf_restore > 0, cfg.hf_restore_window),
            )
            if on and window != (0.0, 1.0)
        ]
        if partial and not self._warned_no_position:
            self._warned_no_position = True
            warnings.warn(
                f"qsilk: {' and '.join(partial)} cannot be applied without a position in the schedule; pass "
                "progress= (or step= and num_steps=). Every enabled operator runs on every call.",
                RuntimeWarning,
                stacklevel=3,
            )

    def __call__(
        self,
        x0: torch.Tensor,
        *,
        progress: float | None = None,
        step: int | None = None,
        num_steps: int | None = None,
        confidence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stabilise ``x0`` (B, C, H, W). Position (keyword-only): ``progress`` in [0, 1] (0 = first step,
        1 = last), or ``step`` and ``num_steps``; without one every enabled operator runs (and a window other than
        (0, 1) cannot be applied: warned once). ``confidence``: optional (B or 1, 1, h, w) map in [0, 1]."""
        cfg = self.config
        p = schedule_progress(step, num_steps, progress)
        if p is None:
            self._warn_windows_unusable()
        clamp_on = cfg.clamp and _in_window(cfg.clamp_window, p)
        aqclip_on = cfg.aqclip and _in_window(cfg.aqclip_window, p)
        self.last_confidence = None
        if not (clamp_on or aqclip_on):  # untouched, unchecked: inactive must equal absent
            self._record(x0, x0, x0, False, False, None)
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
            tile, stride = resolve_tile(cfg.aqclip_tile, cfg.aqclip_stride, *clamped.shape[-2:])
            centre, half = aqclip_corridor(clamped, conf, tile, stride, cfg.aqclip_k_min, cfg.aqclip_k_max)
            if cfg.ema > 0 and self._corridor is not None and self._corridor[0].shape == centre.shape:
                prev_centre, prev_half = self._corridor
                centre = cfg.ema * prev_centre + (1 - cfg.ema) * centre
                half = cfg.ema * prev_half + (1 - cfg.ema) * half
            self._corridor = (centre, half)
            out = apply_corridor(clamped, centre, half, cfg.aqclip_softness)
            if cfg.aqclip_edge_gate and out is not clamped:
                gate = conf if conf is not None else structure_confidence(clamped)
                out = edge_gate(clamped, out, gate, *cfg.aqclip_edge_range)
        if cfg.hf_restore > 0 and out is not x0 and _in_window(cfg.hf_restore_window, p):
            out = restore_high_frequencies(x0, out, cfg.hf_restore)
        self.last_confidence = conf
        self._record(x0, clamped, out, clamp_on, aqclip_on, conf)
        return out

    def _record(self, x0, clamped, out, clamp_on: bool, aqclip_on: bool, conf) -> None:
        self.last_step_stats = (
            step_stats(x0, clamped, out, clamp_on, aqclip_on, conf) if self.collect_stats else None
        )
