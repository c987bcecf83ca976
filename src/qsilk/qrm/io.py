"""QRM weights on disk: ``NAME.safetensors`` (tensors) + ``NAME.json`` (config incl. backbone class, config hash,
head layout and window, plus free-form metadata). Never pickles. Writes are atomic (temp file + rename)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from qsilk.files import atomic_save_tensors, atomic_write_bytes

from .config import QRMConfig
from .module import QRM

__all__ = ["FORMAT", "load_qrm", "read_qrm_record", "save_qrm"]

FORMAT = "qsilk-qrm/1"


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def save_qrm(
    qrm: QRM, path: str | Path, metadata: dict | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write ``path.safetensors`` + ``path.json``; returns the safetensors path. ``dtype`` (e.g. fp16) shrinks
    the file; loading casts back to fp32."""
    weights, meta = _paths(path)
    state = {k: (v.to(dtype) if dtype is not None else v) for k, v in qrm.state_dict().items()}
    atomic_save_tensors(state, weights, metadata={"format": FORMAT})
    record = {"format": FORMAT, "config": qrm.config.to_dict(), "metadata": metadata or {}}
    atomic_write_bytes(meta, json.dumps(record, indent=2).encode())
    return weights


def read_qrm_record(path: str | Path) -> dict:
    _, meta = _paths(path)
    if not meta.exists():
        raise FileNotFoundError(f"no QRM config at {meta}")
    record = json.loads(meta.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(
            f"{meta} is not a QRM checkpoint (format {record.get('format')!r}, expected {FORMAT!r})"
        )
    return record


def load_qrm(path: str | Path, transformer: nn.Module | None = None) -> QRM:
    """Load a QRM; with ``transformer`` given, a backbone mismatch (class, config hash, head layout) raises
    ``ValueError`` naming it."""
    weights, _ = _paths(path)
    record = read_qrm_record(path)
    config = QRMConfig.from_dict(record["config"])
    if transformer is not None:
        config.check_backbone(transformer)
    qrm = QRM(config)
    state = load_file(str(weights))
    missing = set(qrm.state_dict()) - set(state)
    unexpected = set(state) - set(qrm.state_dict())
    if missing or unexpected:
        raise ValueError(
            f"{weights}: tensors do not match the config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    qrm.load_state_dict({k: v.float() for k, v in state.items()})
    qrm.metadata = record.get("metadata", {})
    return qrm.eval()
