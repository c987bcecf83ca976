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
    """``--config`` value -> dict: inline JSON (starting with ``{`` or ``[``), a path to a JSON file, or other inline
    JSON (a number, a string: reported as not an object)."""
    text = source.strip()
    if not text.startswith(("{", "[")) and _is_file(text):
        origin = f"config file {source}"
        try:
            text = Path(text).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise CliError(f"cannot read config file {source}: {one_line(err)}") from None
    else:
        origin = "inline --config JSON"
        try:
            json.loads(text)
        except json.JSONDecodeError:
            if not text.startswith(("{", "[")):  # neither a file nor JSON: most likely a mistyped path
                raise CliError(f"config file {source} does not exist (nor is it inline JSON)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CliError(f"malformed JSON in {origin}: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(data, dict):
        raise CliError(f"{origin} must hold a JSON object ({{\"key\": value, ...}}), not {_json_type(data)}")
    return data


def _is_file(text: str) -> bool:
    try:
        return bool(text) and Path(text).expanduser().is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte ...
        return False


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def preset_config(name: str) -> dict[str, Any]:
    """A named QSilk config shipped in the package, as a dict; unknown names are a one-line error."""
    from qsilk import QSilkConfig

    names = list(QSilkConfig.preset_names())
    if name not in names:
        raise CliError(f"unknown preset {name!r}; choose from {', '.join(names)}")
    return QSilkConfig.preset(name).to_dict()


def default_config() -> dict[str, Any]:
    from qsilk import QSilkConfig

    return QSilkConfig().to_dict()


def build_config(source: str | None, flags: dict[str, Any], preset: str | None = None) -> dict[str, Any]:
    """A validated ``QSilkConfig`` dict: a preset (default: the defaults), then an optional file/inline JSON, then
    CLI flags; each later one overrides the keys it sets."""
    from qsilk import QSilkConfig

    data = preset_config(preset) if preset is not None else {}
    origin = f"config {source}" if source is not None else "QSilk options"
    if source is not None:
        given = read_config_source(source)
        try:
            QSilkConfig.from_dict({**data, **given})  # name bad keys against the file alone, before flags mix in
        except (ValueError, TypeError) as err:
            raise CliError(f"{origin}: {one_line(err)}") from None
        data.update(given)
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


def describe(config: dict[str, Any]) -> str:
    """What a config changes from the defaults, e.g. ``clamp_mode=hard, aqclip_k_max=3`` ("defaults" if nothing)."""
    defaults = default_config()
    changed = [f"{k}={_short(v)}" for k, v in config.items() if defaults.get(k) != v]
    return ", ".join(changed) if changed else "defaults"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def config_label(source: str, config: dict[str, Any]) -> str:
    """Column label of ``compare --config``: a file's stem, or for inline JSON the keys it changes."""
    if not source.strip().startswith(("{", "[")) and _is_file(source.strip()):
        return Path(source.strip()).stem
    return describe(config)


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
