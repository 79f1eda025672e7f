"""Run a function right after a module is imported, whoever imports it.

``import svdllm_plugin`` is light (the ``svdllm`` command must answer ``--help`` without
loading torch or llmcompressor), yet it promises that recipes resolve our modifiers: it asks
for the modifiers to be registered the moment llmcompressor finishes loading, or at once if
llmcompressor is already loaded.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Callable

__all__ = ["when_imported"]

_pending: dict[str, list[Callable[[], None]]] = {}


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once module ``name`` is imported (now, if it already is)."""
    if name in sys.modules:
        callback()
        return
    _pending.setdefault(name, []).append(callback)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of a watched module so callbacks follow its import."""

    def find_spec(self, name, path, target=None):
        if name not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, name)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def __getattr__(self, attr):  # resources, get_source, ... of the real loader
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for callback in _pending.pop(self._name, []):
            callback()
