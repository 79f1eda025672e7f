"""A stand-in for loguru on machines that lack it (a bare GPU box: torch + transformers only).

`benchmarks/gpu_decode.sh` puts this folder on PYTHONPATH only when ``import loguru`` fails.
It maps the calls the plugin makes (``logger.info/warning/debug/error``, ``remove``, ``add``)
onto the standard library's logging.
"""

from __future__ import annotations

import logging
import sys


class _Logger:
    def __init__(self):
        self._log = logging.getLogger("svdllm")

    def remove(self, *args, **kwargs) -> None:
        pass

    def add(self, sink=sys.stderr, level="INFO", **kwargs) -> int:
        handler = logging.StreamHandler(sink if hasattr(sink, "write") else sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(message)s"))
        self._log.handlers[:] = [handler]
        self._log.setLevel(level if isinstance(level, int) else str(level).upper())
        return 0

    def bind(self, **kwargs):
        return self

    def opt(self, *args, **kwargs):
        return self

    def __getattr__(self, name: str):
        method = getattr(self._log, {"success": "info", "trace": "debug"}.get(name, name), self._log.info)

        def log(message, *args, **kwargs):
            text = str(message)
            if args or kwargs:
                text = text.format(*args, **kwargs)
            method(text)

        return log


logger = _Logger()
