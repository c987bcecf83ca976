"""The ``qsilk`` command line (``qsilk generate | compare | info``); see :mod:`qsilk.cli.app`."""

from .app import app, main

__all__ = ["app", "main"]
