"""QRM: a small learned module that adds quality-aware deltas to the adaLN modulation of a frozen diffusion
transformer (DiT, PixArt, SD3/SD3.5, Flux in diffusers). Method and measurements: docs/qrm.md.

    from qsilk.qrm import QRM, QRMConfig, attach, detach, load_qrm
    qrm = load_qrm(path, pipe.transformer)        # or load_demo_qrm() for the shipped demo-model QRM
    with attach(pipe, qrm):                       # composable with qsilk.enable(pipe)
        images = pipe(...).images
"""

from __future__ import annotations

from pathlib import Path

from .config import QRMConfig
from .heads import HeadSpec, UnsupportedBackboneError, config_hash, discover_heads
from .hooks import QRMHandle, attach, attached, detach
from .io import load_qrm, save_qrm
from .module import QRM

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "qrm"
DEMO_QRM_NAME = "demo_qrm_light"


def demo_qrm_path() -> Path:
    return ASSET_DIR / f"{DEMO_QRM_NAME}.safetensors"


def load_demo_qrm(transformer=None) -> QRM:
    """The light QRM trained for the shipped demo model (see docs/qrm.md for what it does and does not do)."""
    path = demo_qrm_path()
    if not path.exists():
        raise FileNotFoundError(f"no shipped demo QRM at {path}")
    return load_qrm(path, transformer)


__all__ = [
    "QRM",
    "HeadSpec",
    "QRMConfig",
    "QRMHandle",
    "UnsupportedBackboneError",
    "attach",
    "attached",
    "config_hash",
    "demo_qrm_path",
    "detach",
    "discover_heads",
    "load_demo_qrm",
    "load_qrm",
    "save_qrm",
]
