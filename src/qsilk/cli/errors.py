"""The one exception type the CLI turns into ``error: ...`` on stderr and exit code 2."""

from __future__ import annotations


class CliError(Exception):
    """Bad input (a path, an option value, a config file): reported in one line, exit code 2, no traceback."""

    exit_code = 2


def one_line(message: object) -> str:
    """Collapse a (possibly multi-line) message into one line: users grep logs, tests compare lines."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts) if parts else type(message).__name__


class SamplingError(CliError):
    """The sampler itself failed (e.g. diverged to NaN): one line, exit code 1."""

    exit_code = 1
