"""Atomic outputs: write into a sibling temp folder, rename into place only on success.

A temp folder is named ``.NAME.tmp-PID-XXXX`` and holds a marker file ``.svdllm-partial``
with the writer's pid and host. A process killed outright (SIGKILL, power loss) cannot
clean up after itself, so the next write into the same parent folder removes every temp
folder of this scheme whose marker names a dead process of this host; it never touches
a folder without the marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from loguru import logger

__all__ = ["atomic_output_dir", "check_output_dir", "remove_stale_temp_dirs", "MARKER"]

MARKER = ".svdllm-partial"
_TEMP_NAME = re.compile(r"^\..+\.tmp-\d+-[A-Za-z0-9_]+$")


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output folder that cannot be written, before any work is done.

    It must not exist (unless ``overwrite``; then it must be a folder), its nearest existing
    ancestor must be a writable folder. Stale temp folders of killed runs beside it are removed.
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {path} already exists; choose a new --output or pass --overwrite"
        )
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output {path} is a file, not a folder; choose another --output")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(
            f"cannot create output folder {path}: {ancestor} is a file, not a folder; choose another --output"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot create output folder {path}: no write permission in {ancestor}; choose another --output"
        )
    if path.parent.is_dir():
        remove_stale_temp_dirs(path.parent)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_dirs(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp folders in ``folder`` that killed runs of this scheme left; return them."""
    removed = []
    for entry in Path(folder).iterdir():
        marker = entry / MARKER
        if not (
            _TEMP_NAME.match(entry.name) and entry.is_dir() and not entry.is_symlink() and marker.is_file()
        ):
            continue
        try:
            owner = json.loads(marker.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host != socket.gethostname():
            logger.warning(
                "{} was left by a run on host {}; remove it by hand if that run is over", entry, host
            )
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        logger.warning("Removed {}: a partial output left by a killed run (pid {})", entry, pid)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temp folder beside ``path``; on success it replaces ``path`` in one rename.

    On any exception the temp folder is removed and ``path`` is left as it was, so a
    half-written checkpoint never sits where a good one is expected.
    """
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        (tmp / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        yield tmp
        (tmp / MARKER).unlink()
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
