"""``qsilk train-qrm``: the QRM trainer's own argparse parser (``python -m qsilk.qrm.train``), forwarded unchanged.
Registered by ``qsilk.cli.app``; nothing here imports the CLI package."""

from __future__ import annotations

import typer


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


__all__ = ["register"]
