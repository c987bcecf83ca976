"""``QSilkConfig``: every knob of QSilk in one flat dataclass that round-trips to JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIDENCE_SOURCES = ("structure", "attention", None)
PLACEMENTS = ("x0", "final")

# Named presets shipped with the package: the fields each one changes from the defaults.
# "strong": a 1 % clamp quantile and a narrower AQClip corridor, the setting the README hero image uses
# (configs/qsilk-strong.json holds the same values; a test keeps them equal).
# "detail": "strong" with tiles that scale with the latent and the clip's high frequencies given back in the second
# half of the schedule (issue 8 item 4, docs/study.md "Tuning"): on the demo model's few-step corner it narrows the
# high-frequency gap where "strong" widens it, at an unchanged FID. Not the default: see docs/study.md.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "strong": {"clamp_quantile": 0.01, "aqclip_k_min": 1.5, "aqclip_k_max": 3.0},
    "detail": {
        "clamp_quantile": 0.01,
        "aqclip_k_min": 1.5,
        "aqclip_k_max": 3.0,
        "aqclip_tile": "auto",
        "aqclip_stride": "auto",
        "hf_restore": 1.0,
        "hf_restore_window": (0.5, 1.0),
    },
}


_BOOLS = ("clamp", "clamp_per_channel", "aqclip", "aqclip_edge_gate")
_INTS = ("attention_max_queries", "attention_max_heads")
_INTS_OR_AUTO = ("aqclip_tile", "aqclip_stride")  # "auto": scale with the latent (qsilk.ops.auto_tile)
AUTO = "auto"
_FLOATS = (
    "clamp_quantile",
    "clamp_softness",
    "aqclip_k_min",
    "aqclip_k_max",
    "aqclip_softness",
    "ema",
    "attention_ema",
    "hf_restore",
)
_WINDOWS = ("clamp_window", "aqclip_window", "hf_restore_window")


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):  # "false", 0 and 1 are not booleans: a string "false" would read as True
        raise ValueError(f"{name} must be true or false (a boolean), got {value!r}")
    return value


def _int(value: Any, name: str) -> int:
    # Integral floats (16.0) are rejected too: one rule from Python and JSON alike, no silent truncation.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _int_or_auto(value: Any, name: str) -> int | str:
    if value == AUTO and isinstance(value, str):
        return AUTO
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f'{name} must be an integer or "auto", got {value!r}')
    return int(value)


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _window(value: Any, name: str) -> tuple[float, float]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a pair [start, end] in progress units, got {value!r}")
    start, end = (_float(v, name) for v in value)
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"{name} must satisfy 0 <= start <= end <= 1, got {value!r}")
    return (start, end)


@dataclass
class QSilkConfig:
    """QSilk settings. Windows are ``(start, end)`` in schedule progress (0 = first step, 1 = last step);
    an operator acts at a step iff ``start <= progress <= end``."""

    # micro-clamp: per-sample [Q_q, Q_(1-q)] corridor
    clamp: bool = True
    clamp_quantile: float = 0.001
    clamp_mode: str = "soft"
    clamp_per_channel: bool = False
    clamp_softness: float = 0.25
    clamp_window: tuple[float, float] = (0.0, 1.0)
    # AQClip: per-tile, per-channel corridor centre +- (k_min + (k_max - k_min) * confidence) * std
    aqclip: bool = True
    # tile / stride in latent pixels, or "auto": tile = min(H, W) // 4 clamped to [4, 16], stride = tile // 2 (16 / 8,
    # i.e. unchanged, for 64x64 and larger latents; several tiles on small ones). "auto" stride: tile // 2.
    aqclip_tile: int | str = 16
    aqclip_stride: int | str = 8
    aqclip_k_min: float = 2.5
    aqclip_k_max: float = 4.5
    aqclip_softness: float = 0.25
    aqclip_window: tuple[float, float] = (0.0, 1.0)
    # detail preservation (qsilk.ops.detail; off by default). Edge gate: give AQClip's change back where the
    # confidence is high (linear from aqclip_edge_range[0] to fully kept original at [1]): only low-confidence
    # outliers are clipped.
    aqclip_edge_gate: bool = False
    aqclip_edge_range: tuple[float, float] = (0.5, 0.9)
    # High-frequency restore: out + hf_restore * highpass(x0 - out) in hf_restore_window (progress), i.e. keep the
    # clip's low-frequency correction and give back the high-frequency energy it removed (0 = off, 1 = all).
    hf_restore: float = 0.0
    hf_restore_window: tuple[float, float] = (0.0, 1.0)
    # confidence source for AQClip: "structure" (gradient proxy), "attention" (entropy probe) or None (uniform)
    confidence: str | None = "structure"
    # EMA of the AQClip corridor across steps (0 = off)
    ema: float = 0.0
    # "x0": the guided x0 prediction at every step (default); "final": the last step's output only (reference)
    placement: str = "x0"
    # attention probe (confidence="attention")
    attention_layers: tuple[str, ...] | None = None
    attention_max_queries: int = 256
    attention_max_heads: int = 4
    attention_ema: float = 0.0

    def __post_init__(self) -> None:
        # Types first (every value, from Python or JSON), then ranges; each error names its key.
        for name in _BOOLS:
            setattr(self, name, _bool(getattr(self, name), name))
        for name in _INTS:
            setattr(self, name, _int(getattr(self, name), name))
        for name in _INTS_OR_AUTO:
            setattr(self, name, _int_or_auto(getattr(self, name), name))
        for name in _FLOATS:
            setattr(self, name, _float(getattr(self, name), name))
        for name in _WINDOWS:
            setattr(self, name, _window(getattr(self, name), name))
        if self.attention_layers is not None:
            layers = self.attention_layers
            if isinstance(layers, str) or not isinstance(layers, Sequence):
                raise ValueError(f"attention_layers must be a list of layer names or null, got {layers!r}")
            if not all(isinstance(n, str) and n for n in layers):
                raise ValueError(f"attention_layers must contain non-empty strings, got {layers!r}")
            self.attention_layers = tuple(layers)
        if not 0.0 < self.clamp_quantile < 0.5:
            raise ValueError(f"clamp_quantile must be in (0, 0.5), got {self.clamp_quantile!r}")
        if self.clamp_mode not in ("soft", "hard"):
            raise ValueError(f"clamp_mode must be 'soft' or 'hard', got {self.clamp_mode!r}")
        for name in ("clamp_softness", "aqclip_softness"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        tile, stride = self.aqclip_tile, self.aqclip_stride
        if tile == AUTO and stride != AUTO:
            raise ValueError(
                f'aqclip_tile "auto" needs aqclip_stride "auto" too, got aqclip_stride={stride!r}'
            )
        if tile != AUTO and (tile < 1 or (stride != AUTO and (stride < 1 or stride > tile))):
            raise ValueError(f"need 1 <= aqclip_stride <= aqclip_tile, got tile={tile}, stride={stride}")
        edge = self.aqclip_edge_range
        if isinstance(edge, str | bytes) or not isinstance(edge, Sequence) or len(edge) != 2:
            raise ValueError(f"aqclip_edge_range must be a pair [low, high] of confidences, got {edge!r}")
        low, high = (_float(v, "aqclip_edge_range") for v in edge)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"aqclip_edge_range must satisfy 0 <= low <= high <= 1, got {edge!r}")
        self.aqclip_edge_range = (low, high)
        if not 0.0 <= self.hf_restore <= 1.0:
            raise ValueError(f"hf_restore must be in [0, 1], got {self.hf_restore!r}")
        if not 0 <= self.aqclip_k_min <= self.aqclip_k_max:
            raise ValueError(
                f"need 0 <= aqclip_k_min <= aqclip_k_max, got {self.aqclip_k_min}, {self.aqclip_k_max}"
            )
        if self.confidence not in CONFIDENCE_SOURCES:
            raise ValueError(f"confidence must be one of {CONFIDENCE_SOURCES}, got {self.confidence!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        for name in ("ema", "attention_ema"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.attention_max_queries < 1 or self.attention_max_heads < 1:
            raise ValueError("attention_max_queries and attention_max_heads must be >= 1")

    @classmethod
    def noop(cls) -> QSilkConfig:
        """Every operator off: enabling QSilk with this config leaves a pipeline bit-identical."""
        return cls(clamp=False, aqclip=False)

    @classmethod
    def preset(cls, name: str) -> QSilkConfig:
        """A named preset shipped with the package (see :meth:`preset_names`), e.g. ``QSilkConfig.preset("strong")``."""
        if name not in PRESETS:
            raise ValueError(f"unknown QSilk preset {name!r}; available presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        return tuple(PRESETS)

    @property
    def is_noop(self) -> bool:
        return not (self.clamp or self.aqclip)

    def replace(self, **changes: Any) -> QSilkConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QSilkConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a QSilk config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QSilk config key(s) {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as err:  # e.g. a string where a number was expected
            raise ValueError(f"invalid QSilk config: {err}") from None

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> QSilkConfig:
        """Parse a JSON string, or read a ``.json`` file when given a path."""
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith(("{", "[")):
            try:
                text = Path(text_or_path).read_text()
            except OSError as err:
                raise ValueError(f"cannot read QSilk config {text_or_path}: {err.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"malformed QSilk config JSON: {err}") from None
        return cls.from_dict(data)
