"""The default text ("embedded"), present offline wherever the plugin is installed.

Calibration / evaluation text: the docstrings of the Python standard library, read with
``ast`` (nothing is imported). Modules are dealt into two splits, every 10th module to
"evaluation", so held-out text comes from modules calibration never saw. Cached on disk.
Another domain for over-fitting checks: the license prose of the installed packages.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from loguru import logger

from svdllm_plugin.models import cache_dir

__all__ = ["EMBEDDED", "SPLITS", "embedded_text", "other_domain_text", "check_split", "read_text"]

EMBEDDED = "embedded"
SPLITS = ("calibration", "evaluation")

_FORMAT = "v2"  # bump when the extraction below changes, so old caches are not reused
_EVAL_EVERY = 10  # every 10th module (in sorted order) is held out for evaluation
_MIN_DOC_CHARS = 40
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "venv",
    "__phello__",
    "__pycache__",
    "lib-dynload",
    "pydoc_data",
    "encodings",  # encodings: hundreds of generated, near-identical codecs
}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _definitions(node: ast.AST):
    """Classes and functions under ``node``, in source order, also inside if/try/with/match blocks.

    Only statement bodies are visited, not expressions: far fewer nodes than ``ast.walk``,
    and the only places a docstring can hang from.
    """
    for field in ("body", "orelse", "handlers", "finalbody", "cases"):
        children = getattr(node, field, None)
        for child in children if isinstance(children, list) else ():
            if isinstance(child, _DOC_NODES):
                yield child
            yield from _definitions(child)


def _module_docstrings(path: Path) -> list[str]:
    """Docstrings of a module, its classes and functions, in source order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    docs = []
    for node in [tree, *_definitions(tree)]:
        doc = ast.get_docstring(node)
        if doc is None or len(doc) < _MIN_DOC_CHARS:
            continue
        try:
            doc.encode("utf-8")  # a lone surrogate (from a "\ud800" escape) cannot be cached
        except UnicodeEncodeError:
            continue
        docs.append(doc)
    return docs


def _build_embedded() -> dict[str, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()  # a docstring repeated across modules would leak between splits
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    modules = {s: 0 for s in SPLITS}
    for path in _stdlib_files(root):
        docs = [d for d in _module_docstrings(path) if d not in seen]
        if not docs:
            continue
        seen.update(docs)
        split = "evaluation" if sum(modules.values()) % _EVAL_EVERY == _EVAL_EVERY - 1 else "calibration"
        modules[split] += 1
        parts[split] += docs
    texts = {s: "\n\n".join(parts[s]) for s in SPLITS}
    for s in SPLITS:
        logger.info("Embedded text, {}: {} modules of {}, {:,} chars", s, modules[s], root, len(texts[s]))
    return texts


def _embedded_path(split: str) -> Path:
    stdlib = sysconfig.get_paths()["stdlib"]
    tag = hashlib.sha1(stdlib.encode()).hexdigest()[:8]  # two installs of one version may differ
    version = "{}{}.{}.{}".format(sys.implementation.name, *sys.version_info[:3])
    return cache_dir() / "text" / f"stdlib-docstrings-{_FORMAT}-{version}-{tag}-{split}.txt"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a cache can be read by all
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def embedded_text(split: str) -> str:
    """The stdlib-docstring text of ``split`` ("calibration" or "evaluation"), cached on disk."""
    check_split(split)
    path = _embedded_path(split)
    if path.exists():
        return read_text(path)
    start = time.perf_counter()
    texts = _build_embedded()
    for s, text in texts.items():
        _write_atomic(_embedded_path(s), text)
    logger.info("Built the embedded text in {:.1f} s; cached in {}", time.perf_counter() - start, path.parent)
    return texts[split]


def read_text(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def other_domain_text() -> str:
    """English legal prose: the license files of the installed packages (site-packages'
    ``*.dist-info/**/LICEN*``), de-duplicated by content, in path order. Another domain than the
    docstring calibration text, present offline on every machine the plugin is installed on."""
    root = Path(sysconfig.get_paths()["purelib"])
    seen, parts = set(), []
    for path in sorted(root.glob("*.dist-info/**/*")):
        if not path.is_file() or not path.name.upper().startswith("LICEN"):
            continue
        text = path.read_text(errors="replace").strip()
        digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()  # same text, other spacing
        if text and digest not in seen:
            seen.add(digest)
            parts.append(text)
    if not parts:
        raise FileNotFoundError(f"no license files under {root}/*.dist-info: no other-domain text")
    return "\n\n".join(parts)
