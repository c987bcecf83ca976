"""The ``qsilk study`` subcommand: forwards its arguments to ``python -m qsilk.study`` (one parser, one behaviour)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        short_help="Methods x steps x CFG on paired seeds, bootstrap CIs vs plain CFG, HTML report (resumable).",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )
    def study(ctx: typer.Context) -> None:
        """Run or resume a study; `qsilk study --help` lists the options."""
        from .__main__ import main

        code = main(list(ctx.args))
        if code:
            raise typer.Exit(code)


__all__ = ["register"]
