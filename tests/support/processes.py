"""Fresh Python processes for the checkpoint tests: a compressed folder read by stock transformers,
with or without svdllm_plugin importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_python(args: list, cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd`` with ``pythonpath`` on the path, remote code cached under
    ``cwd/hf_modules``, offline, one thread; stdout and stderr captured."""
    env = dict(
        os.environ,
        PYTHONPATH=str(pythonpath),
        HF_MODULES_CACHE=str(cwd / "hf_modules"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def run_without_plugin(script: str, work: Path, *args) -> dict:
    """``script`` (written to ``work/stock.py``) run with ``args`` in a process where
    ``import svdllm_plugin`` fails: the JSON of its last ``RESULT`` line."""
    blocker = work / "blocker" / "svdllm_plugin"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('svdllm_plugin is blocked in this process')\n")
    (work / "stock.py").write_text(script)
    run = run_python([work / "stock.py", *args], cwd=work, pythonpath=blocker.parent)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))
