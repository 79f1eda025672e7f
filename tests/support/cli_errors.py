"""The harness of the `svdllm` error-contract tables (tests/cli/test_contract.py and
tests/cli/test_input_errors.py): a row is a bad input; running it must give exit 2, nothing on
stdout, one error line on stderr that names the file or option and the fix, no traceback, and
nothing left behind (no output, no temp folder). Rows marked "before load" must fail before any
model weights are read (``load_pretrained`` is replaced by a function that fails the row)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

from svdllm_plugin.cli import main

FAST = ["--num-samples", "2", "--seq-len", "16", "--eval-windows", "1"]
RECIPE = "svd_stage:\n  svd_modifiers:\n    SVDLLMModifier:\n      ratio: {ratio}\n{extra}"


# ---------------------------------------------------------------- what a row can set up


def _write(tmp: Path, files: dict) -> None:
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def truncate(folder: Path) -> None:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def garble_header(folder: Path) -> None:
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff" * 32
    file.write_bytes(bytes(data))


def missing_shard(folder: Path) -> None:
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def edit_ranks(folder: Path, name: str = "model.layers.5.self_attn.q_proj", rank=8) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["svdllm"]["ranks"][name] = rank
    (folder / "config.json").write_text(json.dumps(config))


BERT = json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32})
T5 = json.dumps(
    {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": 1}
)


# ---------------------------------------------------------------- the table


class Case(NamedTuple):
    id: str
    argv: list[str]
    expected: str  # in the error line
    files: dict = {}  # written under the row's tmp_path first
    edit: tuple | None = None  # ("tiny" | "svd", change): {model} is a copy of that folder, changed
    before_load: bool = True  # must fail before any weights load


def compress(*args: str, model: str = "{tiny}", output: str = "{out}") -> list[str]:
    return ["compress", "--model", model, "--output", output, *args, *FAST]


def recipe(extra: str = "", ratio: float = 0.2) -> dict:
    return {"r.yaml": RECIPE.format(ratio=ratio, extra=extra)}


R, D = ("--recipe", "{tmp}/r.yaml"), "--dataset"
W4 = (
    "GPTQModifier:\n      ignore: ['re:.*lm_head']\n      config_groups:\n        g:\n"
    "          targets: [Linear]\n          weights: {num_bits: 4, type: int, symmetric: true, "
    "strategy: group, group_size: 8}\n"
)
LLAMA_ONLY = "tested: Llama-family decoders incl. grouped-query attention"

# placeholders: {tiny} dense tiny Llama folder, {svd} a compressed one, {tmp} the row's tmp_path,
# {out} = {tmp}/out (must not exist afterwards), {model} = {tmp}/model (made by ``edit``)


def fill(text: str, values: dict) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def check_one_error_line(err: str, expected: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("svdllm")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert expected in errors[0], errors[0]
    return errors[0]


def no_leftovers(tmp: Path, before: set[str]) -> None:
    assert not (tmp / "out").exists()
    left = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*")} - before
    assert not left, f"left behind: {sorted(left)}"
    assert not [p for p in tmp.rglob(".*") if ".tmp-" in p.name]


def check_bad_input(case: Case, tiny_dir: Path, svd_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Run one row in-process through ``svdllm_plugin.cli.main`` and check the contract."""
    _, argv, expected, files, edit, before_load = case
    _write(tmp_path, files)
    model = tmp_path / "model"
    if edit is not None:
        source, change = edit
        change(_copy(tiny_dir if source == "tiny" else svd_dir, model))
    before = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    if before_load:
        import svdllm_plugin.checkpoint

        def refuse(*args, **kwargs):
            raise AssertionError("the weights were loaded before the failing check")

        monkeypatch.setattr(svdllm_plugin.checkpoint, "load_pretrained", refuse)
    values = {"tiny": tiny_dir, "svd": svd_dir, "tmp": tmp_path, "out": tmp_path / "out", "model": model}
    capsys.readouterr()
    code = main([fill(a, values) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.out == ""
    check_one_error_line(captured.err, fill(expected, values))
    no_leftovers(tmp_path, before)
