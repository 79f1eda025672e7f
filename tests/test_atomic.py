"""Issue 22: a user's files are never lost, a step is never skipped silently.

The numbered reproductions of the issue, each on the tiny Llama through the CLI in-process
(``svdllm_plugin.cli.main``) or the atomic-output API; rows of one-line errors are in
tests/test_cli_errors.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from svdllm_plugin.atomic import MARKER, atomic_output_dir, check_output_dir
from svdllm_plugin.cli import error_message, main

FAST = ["--num-samples", "2", "--seq-len", "16", "--eval-windows", "1"]
RECORD = {"model_type": "svdllm", "svdllm": {"format": "dense", "ranks": {}}}


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) with a hash of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def _ours(folder: Path, content: str = "1") -> Path:
    """A folder that passes for a checkpoint written by svdllm."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(RECORD))
    (folder / "a").write_text(content)
    return folder


@pytest.fixture
def no_weights_load(monkeypatch):
    """The refusals below happen before any model weights are read."""
    import svdllm_plugin.checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the failing check")

    monkeypatch.setattr(svdllm_plugin.checkpoint, "load_pretrained", refuse)


# ---------------------------------------------------------------- 1. the input model survives


def test_overwrite_never_deletes_the_input_model(tiny_dir, tmp_path, capsys, no_weights_load):
    parent = tmp_path / "par"
    model = shutil.copytree(tiny_dir, parent / "model")
    before = _tree(tmp_path)
    for output, verb in ((parent, "holds"), (model, "is")):
        argv = ["compress", "--model", str(model), "--output", str(output), "--overwrite", *FAST]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--output {output} {verb} the input model {model}; --overwrite would delete it" in err
    assert _tree(tmp_path) == before and not _hidden(tmp_path)


def test_overwrite_never_deletes_an_input_reached_through_a_link(tmp_path):
    out = _ours(tmp_path / "out")
    (out / "data.txt").write_text("text")
    link = tmp_path / "elsewhere" / "data.txt"
    link.parent.mkdir()
    link.symlink_to(out / "data.txt")
    with pytest.raises(FileExistsError, match=f"holds the input dataset {out}/data.txt"):
        check_output_dir(out, overwrite=True, inputs=[("dataset", link)])
    assert (out / "data.txt").read_text() == "text"


# ---------------------------------------------------------------- 2. unrelated files survive


def test_overwrite_never_deletes_a_folder_that_is_not_ours(tiny_dir, tmp_path, capsys, no_weights_load):
    precious = tmp_path / "out" / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "thesis.txt").write_text("x")
    (precious / "sub" / "notes.txt").write_text("y")
    before = _tree(tmp_path)
    argv = ["compress", "--model", str(tiny_dir), "--output", str(precious), "--overwrite", *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{precious} is not a checkpoint written by svdllm" in err and "it holds sub, thesis.txt" in err
    assert "remove it yourself" in err
    assert _tree(tmp_path) == before and not _hidden(tmp_path)


def test_overwrite_replaces_a_checkpoint_of_ours(tmp_path):
    target = _ours(tmp_path / "ckpt")
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(RECORD))
        (tmp / "a").write_text("2")
    assert (target / "a").read_text() == "2" and os.listdir(tmp_path) == ["ckpt"]
    assert not (target / MARKER).exists()


# ---------------------------------------------------------------- 4. never the current folder or a parent


@pytest.mark.parametrize("output", [".", "..", "../..", "./"])
def test_output_dot_or_dotdot_is_refused_up_front(
    output, tiny_dir, tmp_path, monkeypatch, capsys, no_weights_load
):
    work = tmp_path / "a" / "b"
    _ours(work)  # even a checkpoint of ours: replacing the current folder or a parent is never wanted
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    assert main(["compress", "--model", str(tiny_dir), "--output", output, "--overwrite", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the current folder or one of its parents; name a new folder" in err
    assert _tree(tmp_path) == before and not _hidden(tmp_path)
    assert not [p for p in tmp_path.parent.iterdir() if ".tmp-" in p.name]


def test_atomic_output_refuses_the_current_folder_before_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(_ours(tmp_path / "cwd"))
    with pytest.raises(FileExistsError, match="the current folder or one of its parents"):
        with atomic_output_dir("..", overwrite=True):
            raise AssertionError("never reached")
    assert sorted(os.listdir(tmp_path)) == ["cwd"]


# ---------------------------------------------------------------- 5. the swap honours overwrite


def test_folder_that_appears_during_the_write_is_not_replaced(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(FileExistsError, match="appeared while this run was writing; nothing was replaced"):
        with atomic_output_dir(target) as tmp:
            (tmp / "a").write_text("new")
            target.mkdir()
            (target / "user.txt").write_text("theirs")
    assert os.listdir(target) == ["user.txt"] and os.listdir(tmp_path) == ["ckpt"]


def test_swap_with_overwrite_still_refuses_a_folder_that_is_not_ours(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(FileExistsError, match="is not a checkpoint written by svdllm"):
        with atomic_output_dir(target, overwrite=True) as tmp:
            assert (tmp / MARKER).is_file()  # marked while it is written
            (tmp / "a").write_text("new")
            target.mkdir()
            (target / "user.txt").write_text("theirs")
    assert os.listdir(target) == ["user.txt"] and os.listdir(tmp_path) == ["ckpt"]


def test_checkpoint_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    old = _ours(tmp_path / f".ckpt.tmp-{pid}-old", content="old")
    (old / MARKER).write_text(json.dumps({"pid": pid, "host": os.uname().nodename}))
    with pytest.raises(FileExistsError, match="already exists"):  # put back, so it exists again
        check_output_dir(tmp_path / "ckpt")
    assert os.listdir(tmp_path) == ["ckpt"] and (tmp_path / "ckpt" / "a").read_text() == "old"
    assert not (tmp_path / "ckpt" / MARKER).exists()


# ---------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only: skipped where mount is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_says_so_and_keeps_the_old_checkpoint(tiny, tokenizer, small_disk):
    from svdllm_plugin.checkpoint import save_pretrained

    old = _ours(small_disk / "ckpt", content="old")
    before = _tree(old)
    with pytest.raises(OSError) as raised:
        save_pretrained(tiny, old, tokenizer, overwrite=True)  # ~13 MB of weights into 2 MiB
    line = error_message(raised.value)
    assert f"no space left on the device while writing {old} (the old folder is kept)" in line, line
    assert "corrupted" not in line
    assert _tree(old) == before and os.listdir(small_disk) == ["ckpt"]


# ---------------------------------------------------------------- a modifier that did nothing


def test_modifier_that_changed_nothing_fails_and_saves_nothing(tiny_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "svd_stage:\n  svd_modifiers:\n    SVDLLMModifier:\n      ratio: 0.2\n"
        "    MagnitudePruningModifier:\n      targets: ['re:.*svd_u.weight$']\n"
        "      init_sparsity: 0.5\n      final_sparsity: 0.5\n"
    )
    out = tmp_path / "out"
    argv = ["compress", "--model", str(tiny_dir), "--recipe", str(recipe), "--output", str(out), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "MagnitudePruningModifier changed nothing in the model" in err
    assert "use OneshotMagnitudePruningModifier" in err and "nothing was saved" in err
    assert os.listdir(tmp_path) == ["r.yaml"]


# ---------------------------------------------------------------- calibration text too short


def test_overlapping_calibration_windows_are_reported(tokenizer):
    from loguru import logger

    from svdllm_plugin.data import calibration_dataset

    messages = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        calibration_dataset(tokenizer, "word " * 200, num_samples=4, seq_len=32)  # 128 of ~200 tokens
        assert not messages
        calibration_dataset(tokenizer, "word " * 200, num_samples=16, seq_len=32)  # 512 > ~200
    finally:
        logger.remove(sink)
    assert len(messages) == 1 and "the windows overlap" in messages[0] and "give more text" in messages[0]


def test_saving_twice_with_overwrite_replaces_atomically(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_output_dir(target) as tmp:
        (tmp / "config.json").write_text('{"svdllm": {}}')  # ours: --overwrite may replace it
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target, overwrite=True) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash mid-save")
    assert (target / "a").read_text() == "1" and os.listdir(tmp_path) == ["ckpt"]
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "config.json").write_text('{"svdllm": {}}')
        (tmp / "a").write_text("2")
    assert (target / "a").read_text() == "2" and os.listdir(tmp_path) == ["ckpt"]
