"""Atomic outputs: write into a sibling temp folder, rename into place only on success.

A temp folder is named ``.NAME.tmp-PID-XXXX`` and holds a marker file ``.svdllm-partial``
with the writer's pid and host until the final rename. A process killed outright (SIGKILL,
power loss) cannot clean up after itself, so the next write into the same parent folder
removes every temp folder of this scheme whose marker names a dead process of this host; it
never touches a folder without the marker. The old checkpoint that an overwrite moves aside
(``.NAME.tmp-PID-old``, marked too) is put back in place when the run died before the swap.

What ``--overwrite`` may replace: only a checkpoint written by svdllm (a folder whose
config.json has an ``svdllm`` record), never the input model or dataset or a folder that holds
them, never the current folder or one of its parents.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

from loguru import logger

__all__ = [
    "atomic_output_dir",
    "check_output_dir",
    "check_output_file",
    "is_svdllm_checkpoint",
    "remove_stale_temp_dirs",
    "MARKER",
]

MARKER = ".svdllm-partial"
_TEMP_NAME = re.compile(r"^\..+\.tmp-\d+-[A-Za-z0-9_]+$")
_OLD_SUFFIX = "-old"  # the previous checkpoint, moved aside during the swap


def is_svdllm_checkpoint(folder: str | os.PathLike) -> bool:
    """The one rule for "ours": ``folder/config.json`` is a JSON object with an ``svdllm`` record."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("svdllm"), dict)


def _resolved(path: Path) -> Path:
    """``path`` absolute, with ``.``/``..`` and the parent's links resolved (a link itself is kept)."""
    path = Path(os.path.abspath(path))
    return path.parent.resolve() / path.name if path.name else path


def _check_replaceable(path: Path, target: Path, inputs: Iterable[tuple[str, str | os.PathLike]]) -> None:
    """Refuse to replace ``target`` (an existing folder) unless it is a checkpoint of ours and
    holds none of the run's inputs."""
    for what, given in inputs:
        given = Path(given).expanduser()
        for source in dict.fromkeys((_resolved(given), given.resolve())):  # the path, where a link leads
            if source != target and target not in source.parents:
                continue
            raise FileExistsError(
                f"--output {path} {'is' if source == target else 'holds'} the input {what} {source}; "
                "--overwrite would delete it: choose another --output"
            )
    if target.is_symlink() or not is_svdllm_checkpoint(target):
        entries = sorted(p.name for p in target.iterdir())[:3] if target.is_dir() else []
        shown = ", ".join(entries) + (", ..." if len(entries) == 3 else "") if entries else "nothing"
        raise FileExistsError(
            f"--overwrite refused: {path} is not a checkpoint written by svdllm (no config.json with an "
            f'"svdllm" record; it holds {shown}); choose another --output or remove it yourself'
        )


def check_output_file(path: str | os.PathLike, option: str, suffix: str = "") -> Path:
    """Refuse, before any work, a file path that cannot be written: a folder, or a place where
    nothing can be created; a name without a suffix gets ``suffix`` (what a writer would add)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(
            f"{option} {path} is a folder; give a file name, e.g. {path / ('out' + suffix)}"
        )
    if suffix and not path.suffix:
        path = path.with_suffix(suffix)
    _check_creatable(path, _resolved(path), option=option)
    return path


def _check_creatable(path: Path, target: Path, option: str = "output folder") -> None:
    """The nearest existing ancestor must be a folder where a file or folder can really be created."""
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(
            f"cannot create {option} {path}: {ancestor} is a file, not a folder; "
            f"choose another {_flag(option)}"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot create {option} {path}: no write permission in {ancestor}; "
            f"choose another {_flag(option)}"
        )
    try:  # /proc, read-only mounts: access() says yes to root, only a real mkdir tells
        os.rmdir(tempfile.mkdtemp(prefix=".svdllm-probe-", dir=ancestor))
    except OSError as error:
        raise PermissionError(
            f"cannot create {option} {path}: {ancestor} does not accept new files "
            f"({error.strerror}); choose another {_flag(option)}"
        ) from error


def _flag(option: str) -> str:
    return option if option.startswith("--") else "--output"


def check_output_dir(
    path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[tuple[str, str | os.PathLike]] = ()
) -> Path:
    """Refuse an output folder that cannot be written, before any work is done; return it resolved.

    It must not exist, or (with ``overwrite``) be a checkpoint written by svdllm that holds none
    of ``inputs`` (``(what, path)`` pairs, e.g. ``("model", folder)``); it must not be the current
    folder or one of its parents; its nearest existing ancestor must accept a new folder. Stale
    temp folders of killed runs beside it are removed.
    """
    path = Path(path).expanduser()
    target = _resolved(path)
    if target == Path(target.anchor) or target == Path.cwd() or target in Path.cwd().parents:
        raise FileExistsError(
            f"--output {path} is {target}, the current folder or one of its parents; "
            "name a new folder, e.g. --output compressed"
        )
    if target.parent.is_dir():  # first: it may put back a checkpoint a killed overwrite moved aside
        remove_stale_temp_dirs(target.parent)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"output folder {path} already exists; choose a new --output or pass --overwrite"
            )
        if not target.is_dir():
            raise FileExistsError(f"output {path} is a file, not a folder; choose another --output")
        _check_replaceable(path, target, inputs)
    _check_creatable(path, target)
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _mark(folder: Path) -> None:
    (folder / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def _restore_old(entry: Path) -> bool:
    """Put a moved-aside checkpoint back when its run died before the new one took its place."""
    final = entry.with_name(entry.name[1:].rsplit(".tmp-", 1)[0])
    if not entry.name.endswith(_OLD_SUFFIX) or final.exists() or final.is_symlink():
        return False
    os.replace(entry, final)
    (final / MARKER).unlink(missing_ok=True)
    logger.warning("Restored {}: a run that was replacing it was killed before the swap", final)
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
        if pid == os.getpid() or _pid_alive(pid) or _restore_old(entry):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        logger.warning("Removed {}: a partial output left by a killed run (pid {})", entry, pid)
        removed.append(entry)
    return removed


def _swap(tmp: Path, path: Path, overwrite: bool, inputs) -> None:
    """Rename ``tmp`` to ``path``; ``overwrite`` is honoured now, at the moment of the swap."""
    if not (path.exists() or path.is_symlink()):
        os.replace(tmp, path)
        return
    if not overwrite:
        raise FileExistsError(
            f"output folder {path} appeared while this run was writing; nothing was replaced: "
            "choose a new --output or pass --overwrite"
        )
    _check_replaceable(path, path, inputs)
    old = path.with_name(f".{path.name}.tmp-{os.getpid()}{_OLD_SUFFIX}")
    os.replace(path, old)
    _mark(old)  # a kill from here on: the next run puts it back (see _restore_old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        (path / MARKER).unlink(missing_ok=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _disk_full(error: BaseException) -> bool:
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
        if len(chain) > 8:
            break
    return any(
        getattr(e, "errno", None) == errno.ENOSPC
        or any(s in str(e) for s in ("No space left", "StorageFull", "os error 28"))
        for e in chain
    )


@contextlib.contextmanager
def atomic_output_dir(
    path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[tuple[str, str | os.PathLike]] = ()
):
    """Yield a temp folder beside ``path``; on success it replaces ``path`` in one rename.

    On any exception the temp folder is removed and ``path`` is left as it was, so a
    half-written checkpoint never sits where a good one is expected. The checks of
    :func:`check_output_dir` run again at the swap: a folder that appeared meanwhile is
    replaced only with ``overwrite`` and only if it is ours.
    """
    inputs = list(inputs)
    path = check_output_dir(path, overwrite, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        _mark(tmp)
        yield tmp
        _swap(tmp, path, overwrite, inputs)
        (path / MARKER).unlink()
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, Exception) and _disk_full(error):
            kept = "the old folder is kept" if path.exists() else "nothing was written"
            full = OSError(
                f"no space left on the device while writing {path} ({kept}); free some space or choose "
                "another --output"
            )
            full.errno = errno.ENOSPC
            raise full from error
        raise
