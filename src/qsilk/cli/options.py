"""Checks and conversions of option values that need no model: QSilk config, steps, CFG, image size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CliError, one_line

CONFIDENCE_CHOICES = ("structure", "attention", "none")
CLAMP_MODES = ("soft", "hard")

# CLI flag -> QSilkConfig field.
FLAG_FIELDS = {
    "quantile": "clamp_quantile",
    "mode": "clamp_mode",
    "tile": "aqclip_tile",
    "stride": "aqclip_stride",
    "k_min": "aqclip_k_min",
    "k_max": "aqclip_k_max",
    "confidence": "confidence",
    "clamp": "clamp",
    "aqclip": "aqclip",
}


def read_config_source(source: str) -> dict[str, Any]:
    """``--config`` value -> dict: a path to a JSON file, or inline JSON (starting with ``{``)."""
    text = source.strip()
    origin = "inline --config JSON"
    if not text.startswith("{"):
        path = Path(source).expanduser()
        origin = f"config file {source}"
        if not path.is_file():
            raise CliError(f"config file {source} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise CliError(f"cannot read config file {source}: {one_line(err)}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CliError(f"malformed JSON in {origin}: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(data, dict):
        raise CliError(f"{origin} must hold a JSON object, not {type(data).__name__}")
    return data


def build_config(source: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """A validated ``QSilkConfig`` dict from an optional file/inline JSON plus CLI flags (flags win)."""
    from qsilk import QSilkConfig

    data = read_config_source(source) if source is not None else {}
    origin = f"config {source}" if source is not None else "QSilk options"
    if source is not None:
        try:
            QSilkConfig.from_dict(data)  # name unknown keys against the file alone, before flags are mixed in
        except (ValueError, TypeError) as err:
            raise CliError(f"{origin}: {one_line(err)}") from None
    for flag, value in flags.items():
        if value is None:
            continue
        if flag == "confidence":
            value = _confidence(value)
        if flag == "mode" and value not in CLAMP_MODES:
            raise CliError(f"--mode must be one of {', '.join(CLAMP_MODES)}, got {value!r}")
        data[FLAG_FIELDS[flag]] = value
    try:
        return QSilkConfig.from_dict(data).to_dict()
    except (ValueError, TypeError) as err:
        raise CliError(f"{origin}: {one_line(err)}") from None


def _confidence(value: str) -> str | None:
    if value.lower() not in CONFIDENCE_CHOICES:
        raise CliError(f"--confidence must be one of {', '.join(CONFIDENCE_CHOICES)}, got {value!r}")
    return None if value.lower() == "none" else value.lower()


def check_steps(steps: int) -> int:
    if steps < 1:
        raise CliError(f"--steps must be a positive integer, got {steps}")
    if steps > 1000:
        raise CliError(f"--steps must be at most 1000, got {steps}")
    return steps


def check_cfg(cfg: float) -> float:
    if not cfg >= 0 or cfg != cfg or cfg == float("inf"):
        raise CliError(f"--cfg must be a finite number >= 0, got {cfg}")
    return float(cfg)


def check_size(width: int | None, height: int | None) -> tuple[int | None, int | None]:
    if (width is None) != (height is None):
        raise CliError("give both --width and --height, or neither")
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and (value < 8 or value % 8):
            raise CliError(f"{name} must be a positive multiple of 8, got {value}")
    return width, height


def check_prompts(prompts: list[str]) -> list[str]:
    cleaned = []
    for prompt in prompts:
        if not prompt.strip():
            raise CliError("--prompt must not be empty")
        cleaned.append(prompt.strip())
    return cleaned


def config_labels(sources: list[str]) -> list[str]:
    """Column labels for ``compare --config`` values: file stems (inline JSON: config1, ...), made unique."""
    labels: list[str] = []
    taken = {"plain", "qsilk"}
    for i, source in enumerate(sources, 1):
        base = f"config{i}" if source.strip().startswith("{") else Path(source).stem or f"config{i}"
        label, n = base, 2
        while label in taken:
            label, n = f"{base}-{n}", n + 1
        taken.add(label)
        labels.append(label)
    return labels
