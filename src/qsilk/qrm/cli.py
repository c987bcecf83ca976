"""``qsilk train-qrm``: the QRM trainer's own argparse parser (``python -m qsilk.qrm.train``), forwarded unchanged.
Registered by ``qsilk.cli.app``; nothing here imports the CLI package."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import typer


def check_qrm_option(spec: str) -> None:
    """Cheap check of ``--qrm`` before any model is loaded: 'demo' or an existing QRM checkpoint."""
    from . import demo_qrm_path
    from .io import read_qrm_record

    path = demo_qrm_path() if spec == "demo" else Path(spec).expanduser()
    if not path.with_suffix(".safetensors").is_file():
        raise ValueError(
            f"--qrm: no QRM checkpoint at {path}" + (" (the package ships none)" if spec == "demo" else "")
        )
    read_qrm_record(path)


def attach_qrm_option(pipe, spec: str) -> dict[str, Any]:
    """Attach the QRM named by ``--qrm`` ('demo' or a checkpoint path) to ``pipe``; returns the record that goes
    into each image's reproduction parameters (path and a hash of the weights). Mismatch: ``ValueError``."""
    from . import attach, demo_qrm_path, load_qrm

    path = demo_qrm_path() if spec == "demo" else Path(spec).expanduser().with_suffix(".safetensors")
    qrm = load_qrm(path, pipe.transformer)
    attach(pipe, qrm)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return {
        "path": spec if spec == "demo" else str(path.resolve()),
        "sha256": digest,
        "kind": qrm.config.kind,
    }


def register(app: typer.Typer) -> None:
    @app.command(
        name="train-qrm",
        short_help="Train a QRM on the demo model (ReFL-style, resumable safetensors checkpoints).",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )
    def train_qrm(ctx: typer.Context) -> None:
        """Train or resume a QRM; `qsilk train-qrm --help` lists the options."""
        from .train import main

        code = main(list(ctx.args), prog="qsilk train-qrm")
        if code:
            raise typer.Exit(code)


__all__ = ["attach_qrm_option", "check_qrm_option", "register"]
