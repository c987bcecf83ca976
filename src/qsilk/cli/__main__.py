"""``python -m qsilk.cli`` = the ``qsilk`` console script."""

from qsilk.cli import main

raise SystemExit(main())
