"""Atomic, resumable checkpoints: safetensors for tensors, JSON for counters.

Layout of a run folder::

    <run>/ckpt/step-00001234/{model,ema,optim}.safetensors + state.json
    <run>/ckpt/latest.json      {"dir": "step-00001234", "step": 1234}

A checkpoint folder is written under a temporary name and renamed into place, then ``latest.json`` is replaced
atomically, so a reader (``export``) or a SIGTERM never sees a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qsilk.files import atomic_write_text, temp_path


def optimizer_tensors(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name (``<name>::exp_avg`` ...)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"{names[id(p)]}::{key}"] = value.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, tensors: dict[str, torch.Tensor]
) -> None:
    params = dict(model.named_parameters())
    for full_key, value in tensors.items():
        name, key = full_key.split("::")
        p = params[name]
        optimizer.state[p][key] = value.to(p.device) if key != "step" else value
    return None


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    optim_model: torch.nn.Module | None,
    state: dict,
    keep: int = 2,
) -> Path:
    ckpt_root = Path(run_dir) / "ckpt"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = temp_path(final)  # the folder is written whole under a temp name, then renamed
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for key, module in modules.items():
        save_file(_state_dict(module), str(tmp / f"{key}.safetensors"))
    if optimizer is not None:
        save_file(optimizer_tensors(optimizer, optim_model), str(tmp / "optim.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = json.dumps({"dir": name, "step": step}, indent=2, sort_keys=True) + "\n"
    atomic_write_text(ckpt_root / "latest.json", pointer)
    # Prune older checkpoints, never the one just written.
    olds = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and p.name != name)
    for old in olds[: max(len(olds) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "ckpt" / "latest.json"
    if not pointer.exists():
        return None
    path = pointer.parent / json.loads(pointer.read_text())["dir"]
    return path if path.exists() else None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Returns ({file stem: tensors}, state)."""
    path = Path(path)
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
    state = json.loads((path / "state.json").read_text())
    return tensors, state
