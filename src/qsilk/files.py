"""Whole-file writes: a file is written under a hidden temp name in its own folder, flushed to disk and renamed
over the target, so readers (and a run resumed after a kill) only ever see complete files.

Every writer in the package uses the temp name of :func:`temp_path`, ``.NAME.PID.tmp``: the writer's pid in the
name lets a later run tell a dead writer's leftovers from a live one's (see ``qsilk.cli.runs.clean_temp_files``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def temp_path(path: Path) -> Path:
    """The temp name this process writes ``path`` under (a hidden sibling that carries the pid)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_after(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)``, flush tmp to disk and rename it over ``path``; on any failure the temp file is removed
    and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    _replace_after(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (parent folders are created)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` (same argument order), atomically; tensors are detached, moved to the CPU
    and made contiguous first."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _replace_after(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
