"""Atomic outputs: write into a sibling temp folder, rename into place only on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_output_dir", "check_output_dir"]


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output folder that exists (unless ``overwrite``), before any work is done."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {path} already exists; choose a new --output or pass --overwrite"
        )
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temp folder beside ``path``; on success it replaces ``path`` in one rename.

    On any exception the temp folder is removed and ``path`` is left as it was, so a
    half-written checkpoint never sits where a good one is expected.
    """
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # overwrite: move the old one aside first, drop it after the swap
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
