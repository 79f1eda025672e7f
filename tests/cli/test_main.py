"""The `svdllm` command as a user runs it, in fresh processes: help and argument errors without
importing torch, modifiers registered by `import svdllm_plugin`, a compress killed with SIGKILL during
its save cleaned up by the next run, and a stdout that carries only results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import REPO

from svdllm_plugin.atomic import MARKER, remove_stale_temp_dirs

ENTRY = "import sys; from svdllm_plugin.cli import main; sys.exit(main())"  # what the console script runs
FAST = ["--num-samples", "2", "--seq-len", "16", "--eval-windows", "1"]


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def svdllm(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", ENTRY, *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=cwd,
        timeout=timeout,
    )


def test_help_and_argument_errors_import_nothing_heavy(tmp_path):
    """Help and argument errors answer before torch, transformers or llmcompressor are imported (an
    import of llmcompressor for --help once cost 15 s): the right exit code and stream, and the
    CLI module itself loads none of them."""
    for argv, code in (
        (["--help"], 0),
        (["compress", "--help"], 0),
        (["compress", "--eval-windows", "-1"], 2),
    ):
        result = svdllm(*argv, cwd=tmp_path)
        assert result.returncode == code, result.stderr
        if code == 0:
            assert result.stdout.startswith("usage: svdllm") and result.stderr == ""
        else:
            assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, svdllm_plugin.cli; "
            "print([m for m in ('torch', 'transformers', 'llmcompressor') if m in sys.modules])",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        check=True,
    ).stdout
    assert loaded.strip() == "[]"


def test_import_registers_the_modifiers_for_recipes(tmp_path):
    """README: after `import svdllm_plugin`, llmcompressor recipes resolve our modifiers."""
    code = """
import sys
import svdllm_plugin
assert "llmcompressor" not in sys.modules  # the import itself is light
from llmcompressor.recipe import Recipe
recipe = Recipe.create_instance('''
svd_stage:
  svd_modifiers:
    SVDLLMModifier: {ratio: 0.3}
    OneshotMagnitudePruningModifier: {sparsity: 0.5}
''')
print(",".join(type(m).__name__ for m in recipe.modifiers))
print(svdllm_plugin.checkpoint.save_pretrained.__name__)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["SVDLLMModifier,OneshotMagnitudePruningModifier", "save_pretrained"]


# the child: a real `svdllm compress` whose save stops once the files are written
SLOW_SAVE = """
import contextlib, sys, time
import svdllm_plugin.atomic as atomic
real = atomic.atomic_output_dir

@contextlib.contextmanager
def slow(path, overwrite=False):
    with real(path, overwrite) as tmp:
        yield tmp
        (tmp / "SAVED").write_text("")
        time.sleep(600)

atomic.atomic_output_dir = slow
from svdllm_plugin.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _temp_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(".out.tmp-"))


def test_sigkill_during_save_then_next_run_cleans_up(tiny_dir, tmp_path):
    out = tmp_path / "out"
    # folders the cleanup must leave alone: no marker, and a marker of a live process
    (tmp_path / ".out.tmp-1-notours").mkdir()
    alive = tmp_path / ".other.tmp-1-alive"
    alive.mkdir()
    (alive / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))

    argv = ["compress", "--model", tiny_dir, "--output", out, *FAST]
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, *map(str, argv)],
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not any((p / "SAVED").exists() for p in _temp_dirs(tmp_path)):
            assert child.poll() is None, "the compress ended before its save"
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    partial = [p for p in _temp_dirs(tmp_path) if (p / MARKER).exists()]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").exists() and not out.exists()

    result = svdllm(*argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"Removed {partial[0]}" in result.stderr
    assert _temp_dirs(tmp_path) == [tmp_path / ".out.tmp-1-notours"] and alive.exists()
    assert (out / "config.json").exists() and not (out / MARKER).exists()
    # stdout is the report table alone: llmcompressor's log lines went to stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("|") for line in lines), result.stdout
    assert "No accelerator" not in result.stdout


def test_eval_json_stdout_is_one_json_document(tiny_dir, tmp_path):
    result = svdllm("eval", tiny_dir, "--seq-len", "16", "--max-windows", "1", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)  # the whole stdout, as `svdllm eval ... --json | jq` reads it
    assert parsed["windows"] == 1 and parsed["perplexity"] > 1


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_cleanup_removes_only_its_own_dead_folders(tmp_path):
    host = os.uname().nodename

    def temp(name: str, marker: dict | str | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_text("partial")
        if marker is not None:
            (folder / MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
        return folder

    dead = temp(".ckpt.tmp-7-abc", {"pid": _dead_pid(), "host": host})
    kept = [
        temp(".ckpt.tmp-7-nomarker", None),
        temp(".ckpt.tmp-7-live", {"pid": os.getpid(), "host": host}),
        temp(".ckpt.tmp-7-elsewhere", {"pid": _dead_pid(), "host": host + "-other"}),
        temp(".ckpt.tmp-7-garbled", "not json"),
        temp("ckpt.tmp-7-nodot", {"pid": _dead_pid(), "host": host}),
        temp(".ckpt.old-7", {"pid": _dead_pid(), "host": host}),
    ]
    assert remove_stale_temp_dirs(tmp_path) == [dead]
    assert not dead.exists() and all(k.exists() for k in kept)
