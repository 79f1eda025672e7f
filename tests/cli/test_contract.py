"""Every bad input of the `svdllm` command: a non-zero exit, one error line on stderr that names
the file or option and the fix, no traceback, and nothing left behind (no output, no temp folder).

One table; each row is run in-process through ``svdllm_plugin.cli.main``. Rows marked
"before load" must fail before any model weights are read (``load_pretrained`` is replaced by a
function that fails the row), which is also what makes them fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest

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


def _truncate(folder: Path) -> None:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _garble_header(folder: Path) -> None:
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff" * 32
    file.write_bytes(bytes(data))


def _missing_shard(folder: Path) -> None:
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_ranks(folder: Path, name: str = "model.layers.5.self_attn.q_proj", rank=8) -> None:
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
CASES = [
    # output
    Case(
        "output-exists",
        compress(output="{tmp}/kept"),
        "already exists; choose a new --output or pass --overwrite",
        {"kept/keep.txt": "precious"},
    ),
    Case(
        "output-parent-is-a-file",
        compress(output="{tmp}/file.txt/out"),
        "file.txt is a file, not a folder; choose another --output",
        {"file.txt": "x"},
    ),
    Case(
        "output-is-a-file",
        compress("--overwrite", output="{tmp}/file.txt"),
        "file.txt is a file, not a folder; choose another --output",
        {"file.txt": "x"},
    ),
    # recipe
    Case("recipe-missing", compress(*R), "recipe file {tmp}/r.yaml does not exist; pass a YAML recipe path"),
    Case("recipe-is-a-folder", compress("--recipe", "{tmp}"), "is a folder; pass a YAML recipe path"),
    Case(
        "recipe-bad-yaml",
        compress(*R),
        "r.yaml, line 2: not valid YAML (mapping values are not allowed here); fix the YAML",
        {"r.yaml": "svd_stage: 1\n  bad: 2\n"},
    ),
    Case("recipe-binary", compress(*R), "r.yaml is not UTF-8 text", {"r.yaml": b"\xba\xff\x00"}),
    Case(
        "recipe-no-stage",
        compress(*R),
        "top-level key `SVDLLMModifier` is not a stage",
        {"r.yaml": "SVDLLMModifier:\n  ratio: 0.2\n"},
    ),
    # issue 22, reproduction 3: keys llmcompressor would drop are refused before any work
    Case(
        "recipe-stage-typo",
        compress(*R),
        "top-level key `quant_stag` is not a stage (llmcompressor reads only keys ending in `_stage`) and "
        "would be ignored with all it holds; rename it, e.g. `quant_stage`",
        {"r.yaml": RECIPE.format(ratio=0.2, extra="") + "quant_stag:\n  quant_modifiers:\n    " + W4},
    ),
    Case(
        "recipe-stage-number-after",
        compress(*R),
        "`svd_stage2` is not a stage",
        {"r.yaml": RECIPE.format(ratio=0.2, extra="").replace("svd_stage", "svd_stage2")},
    ),
    Case(
        "recipe-group-typo",
        compress(*R),
        "`svd_stage.svd_modifier` is not a modifier group",
        {"r.yaml": RECIPE.format(ratio=0.2, extra="").replace("svd_modifiers", "svd_modifier")},
    ),
    Case(
        "recipe-duplicate-modifier",
        compress(*R),
        "r.yaml, line 5: `SVDLLMModifier` appears twice in the same mapping (first on line 3); YAML keeps "
        "only the last",
        recipe("    SVDLLMModifier:\n      ratio: 0.4\n"),
    ),
    Case(
        "recipe-modifier-without-settings",
        compress(*R),
        "`svd_stage.svd_modifiers.SVDLLMModifier` must be a mapping of settings; got nothing",
        {"r.yaml": "svd_stage:\n  svd_modifiers:\n    SVDLLMModifier:\n"},
    ),
    Case("recipe-empty", compress(*R), "recipe file {tmp}/r.yaml is empty", {"r.yaml": "# nothing\n"}),
    Case("recipe-scalar", compress(*R), "holds a YAML int, not a mapping of stages", {"r.yaml": "3\n"}),
    Case("recipe-list", compress(*R), "holds a YAML list, not a mapping", {"r.yaml": "- svd_stage\n"}),
    Case(
        "recipe-gptq-before-svd",
        compress(*R),
        "GPTQModifier comes before SVDLLMModifier, which replaces the Linears by new factor Linears",
        {"r.yaml": "q_stage:\n  q_modifiers:\n    " + W4 + RECIPE.format(ratio=0.2, extra="")},
    ),
    Case(
        "recipe-overrides-match-nothing",
        compress(*R),
        "SVDLLMModifier `overrides` pattern 're:.*q_projx$' matches none of the 14 modules it compresses",
        recipe("      overrides: {'re:.*q_projx$': 0.5}\n"),
        before_load=False,
    ),
    Case(
        "recipe-one-target-matches-nothing",
        compress(*R),
        "SVDLLMModifier `targets` pattern 're:.*typo$' matches no module of the model",
        recipe("      targets: ['re:.*q_proj$', 're:.*typo$']\n"),
        before_load=False,
    ),
    Case(
        "recipe-gptq-target-matches-nothing",
        compress(*R),
        "GPTQModifier `targets` pattern 're:.*svd_w$' matches no module of the model nor the factors",
        recipe("    " + W4.replace("[Linear]", "['re:.*svd_w$']")),
        before_load=False,
    ),
    Case("recipe-ratio-1.5", compress(*R), "must be in (0, 1)", recipe(ratio=1.5)),
    Case("recipe-typo", compress(*R), "ratoi: Extra inputs are not permitted", recipe("      ratoi: 0.3\n")),
    Case("recipe-whitening", compress(*R), "cholesky", recipe("      whitening: qr\n")),
    Case(
        "output-in-proc",
        compress(output="/proc/svdllm-out"),
        "cannot create output folder /proc/svdllm-out: /proc",
    ),
    Case(
        "output-not-ours-overwrite",
        compress("--overwrite", output="{tmp}/kept"),
        "--overwrite refused: {tmp}/kept is not a checkpoint written by svdllm (no config.json with an "
        '"svdllm" record; it holds keep.txt); choose another --output or remove it yourself',
        {"kept/keep.txt": "precious"},
    ),
    Case(
        "output-is-the-model",
        compress("--overwrite", model="{model}", output="{model}"),
        "--output {model} is the input model {model}; --overwrite would delete it",
        edit=("svd", lambda folder: None),
    ),
    Case(
        "output-holds-the-dataset",
        compress("--overwrite", D, "{model}/d.txt", output="{model}"),
        "--output {model} holds the input dataset {model}/d.txt; --overwrite would delete it",
        edit=("svd", lambda folder: (folder / "d.txt").write_text("text " * 500)),
    ),
    # dataset
    Case("dataset-missing", compress(D, "{tmp}/d.txt"), "dataset file '{tmp}/d.txt' does not exist"),
    Case(
        "dataset-folder", compress(D, "{tmp}/d"), "dataset {tmp}/d is a folder; give a .txt", {"d/x.txt": "x"}
    ),
    Case("dataset-empty", compress(D, "{tmp}/d.txt"), "dataset file {tmp}/d.txt is empty", {"d.txt": "  \n"}),
    Case("dataset-csv", compress(D, "{tmp}/d.csv"), "unsupported type '.csv'", {"d.csv": "text\na\n"}),
    Case(
        "dataset-jsonl-line-3",
        compress(D, "{tmp}/d.jsonl"),
        "d.jsonl, line 3, column 14: not valid JSON",
        {"d.jsonl": '{"text": "a"}\n{"text": "b"}\n{"text": "c",]}\n'},
    ),
    Case(
        "dataset-jsonl-no-text",
        compress(D, "{tmp}/d.jsonl"),
        'd.jsonl, line 1: has no "text" field',
        {"d.jsonl": '{"body": "a"}\n'},
    ),
    Case(
        "dataset-text-not-a-string",
        compress(D, "{tmp}/d.jsonl"),
        'd.jsonl, line 2: "text" is 42 (int), not a string',
        {"d.jsonl": '{"text": "a"}\n{"text": 42}\n'},
    ),
    Case(
        "dataset-json-broken",
        compress(D, "{tmp}/d.json"),
        "d.json, line 1, column 2: not valid JSON",
        {"d.json": "[}"},
    ),
    Case(
        "dataset-binary-txt",
        compress(D, "{tmp}/d.txt"),
        "dataset file {tmp}/d.txt is not UTF-8 text",
        {"d.txt": bytes(range(256)) * 8},
    ),
    Case("dataset-nul-bytes", compress(D, "{tmp}/d.txt"), "contains NUL bytes", {"d.txt": "\x00" * 5000}),
    Case(
        "dataset-too-short",
        compress(D, "{tmp}/d.txt"),
        "fewer than --seq-len + 1",
        {"d.txt": "just a few words"},
        before_load=False,
    ),
    # model
    Case("model-missing", compress(model="{tmp}/nope"), "model path '{tmp}/nope' does not exist"),
    Case(
        "model-no-config", compress(model="{tmp}/m"), "model folder {tmp}/m has no config.json", {"m/x": "x"}
    ),
    Case(
        "model-is-a-file", compress(model="{tmp}/m.bin"), "is a file; pass an HF model folder", {"m.bin": "x"}
    ),
    Case(
        "model-config-not-json",
        compress(model="{tmp}/m"),
        "config.json is not valid JSON",
        {"m/config.json": "{oops"},
    ),
    Case(
        "model-bert",
        compress(model="{tmp}/bert"),
        "is not a decoder-only causal LM",
        {"bert/config.json": BERT},
    ),
    Case("model-bert-says-what-works", compress(model="{tmp}/bert"), LLAMA_ONLY, {"bert/config.json": BERT}),
    Case("model-t5", compress(model="{tmp}/t5"), "is not a decoder-only causal LM", {"t5/config.json": T5}),
    Case(
        "model-truncated",
        compress(model="{model}"),
        "checkpoint file {model}/model.safetensors is truncated or corrupted",
        edit=("tiny", _truncate),
    ),
    Case(
        "model-garbled-header",
        compress(model="{model}"),
        "{model}/model.safetensors is truncated or corrupted",
        edit=("tiny", _garble_header),
    ),
    Case(
        "model-missing-shard",
        compress(model="{model}"),
        "checkpoint file {model}/model-00002-of-00002.safetensors is missing",
        edit=("tiny", _missing_shard),
    ),
    Case(
        "model-no-tokenizer",
        compress(model="{model}"),
        "model folder {model} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json)",
        edit=("tiny", lambda folder: (folder / "tokenizer.json").unlink()),
    ),
    Case(
        "seq-len-above-positions",
        ["compress", "--model", "{tiny}", "--output", "{out}", "--seq-len", "300", "--num-samples", "1"],
        "--seq-len 300 exceeds the model's max_position_embeddings=256; give --seq-len 256 or less",
    ),
    Case(
        "eval-seq-len-above-positions",
        ["eval", "{svd}", "--seq-len", "300"],
        "--seq-len 300 exceeds the model's max_position_embeddings=256",
    ),
    Case(
        "bench-plot-is-a-folder",
        ["bench", "{tiny}", "--plot", "{tmp}/plots"],
        "--plot {tmp}/plots is a folder; give a file name, e.g. {tmp}/plots/out.png",
        {"plots/old.png": "x"},
    ),
    Case(
        "bench-plot-unknown-type",
        ["bench", "{tiny}", "--plot", "{tmp}/plot.txt"],
        "--plot {tmp}/plot.txt: matplotlib cannot write '.txt' files; end the name in .png, .pdf or .svg",
    ),
    Case(
        "bench-plot-unwritable",
        ["bench", "{tiny}", "--plot", "/proc/svdllm.png"],
        "cannot create --plot /proc/svdllm.png: /proc",
    ),
    Case(
        "hub-id-offline", compress(model="no-org/no-model"), "not in the hub cache, and HF_HUB_OFFLINE is set"
    ),
    # the modifier
    Case("already-factorized", compress(model="{svd}"), "the model is already factorized", before_load=False),
    Case(
        "rank-multiple-too-large",
        compress(*R),
        "`rank_multiple: 4096` is larger than the ranks these matrices allow",
        recipe("      rank_multiple: 4096\n"),
        before_load=False,
    ),
    Case(
        "targets-match-nothing",
        compress(*R),
        "SVDLLMModifier `targets` pattern 're:.*no$' matches no module of the model",
        recipe("      targets: ['re:.*no$']\n"),
        before_load=False,
    ),
    Case("device-cuda-99", compress("--device", "cuda:99"), "CUDA devices; use --device cpu or omit it"),
    # eval / generate / export-gptq
    Case("eval-device-bogus", ["eval", "{tiny}", "--device", "banana"], "--device 'banana' is not a device"),
    Case(
        "generate-device-cuda-99",
        ["generate", "{tiny}", "--prompt", "hi", "--device", "cuda:99"],
        "CUDA devices",
    ),
    Case("eval-missing", ["eval", "{tmp}/nope"], "does not exist"),
    Case("eval-bert", ["eval", "{tmp}/bert"], "is not a decoder-only causal LM", {"bert/config.json": BERT}),
    Case(
        "eval-truncated",
        ["eval", "{model}", "--json"],
        "{model}/model.safetensors is truncated",
        edit=("svd", _truncate),
    ),
    Case(
        "eval-unknown-ranks",
        ["eval", "{model}"],
        "lists 'model.layers.5.self_attn.q_proj' under svdllm.ranks, but the model has no such module",
        edit=("svd", _edit_ranks),
    ),
    Case(
        "eval-bad-rank",
        ["eval", "{model}"],
        "must be a positive integer; got 0",
        edit=("svd", lambda f: _edit_ranks(f, "model.layers.0.self_attn.q_proj", 0)),
    ),
    Case(
        "eval-binary-dataset",
        ["eval", "{tiny}", D, "{tmp}/d.txt"],
        "d.txt is not UTF-8 text",
        {"d.txt": b"\xba" * 100},
    ),
    Case("eval-empty-tasks", ["eval", "{tiny}", "--tasks", ","], "--tasks ',' names no task"),
    Case("generate-missing", ["generate", "{tmp}/nope", "--prompt", "hi"], "does not exist"),
    Case(
        "generate-truncated",
        ["generate", "{model}", "--prompt", "hi"],
        "model.safetensors is truncated",
        edit=("tiny", _truncate),
    ),
    Case(
        "export-exists",
        ["export-gptq", "{svd}", "--output", "{tmp}/kept"],
        "already exists",
        {"kept/keep.txt": "x"},
    ),
    Case(
        "export-unquantized",
        ["export-gptq", "{svd}", "--output", "{out}"],
        "no quantized Linears",
        before_load=False,
    ),
]

# argparse errors: exit 2, one line naming the option, before anything is imported
ARG_CASES = [
    (
        "eval-windows-negative",
        ["compress", "--output", "o", "--eval-windows", "-1"],
        "argument --eval-windows: must be an integer >= 0 (0: skip); got '-1'",
    ),
    (
        "num-samples-zero",
        ["compress", "--output", "o", "--num-samples", "0"],
        "argument --num-samples: must be",
    ),
    (
        "seq-len-text",
        ["compress", "--output", "o", "--seq-len", "abc"],
        "argument --seq-len: must be an integer >= 2",
    ),
    ("output-missing", ["compress"], "the following arguments are required: --output"),
    (
        "max-windows-zero",
        ["eval", "m", "--max-windows", "0"],
        "argument --max-windows: must be an integer >= 1",
    ),
    (
        "limit-zero",
        ["eval", "m", "--tasks", "x", "--limit", "0"],
        "argument --limit: must be an integer >= 1",
    ),
    ("max-new-tokens-zero", ["generate", "m", "--prompt", "p", "--max-new-tokens", "0"], "--max-new-tokens"),
    (
        "bnb-choice",
        ["generate", "m", "--prompt", "p", "--bnb", "fp4"],
        "argument --bnb: invalid choice: 'fp4'",
    ),
    ("unknown-command", ["squash"], "argument COMMAND: invalid choice: 'squash'"),
    ("no-command", [], "the following arguments are required: COMMAND"),
    ("unknown-option", ["eval", "m", "--windows", "3"], "unrecognized arguments: --windows 3"),
]


# ---------------------------------------------------------------- fixtures and checks


@pytest.fixture(scope="module")
def svd_dir(tiny_dir, tmp_path_factory) -> Path:
    """A compressed tiny model, written by the CLI."""
    out = tmp_path_factory.mktemp("svd") / "svd"
    assert main(["compress", "--model", str(tiny_dir), "--output", str(out), *FAST]) == 0
    return out


def _fill(text: str, values: dict) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def _check_one_error_line(err: str, expected: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("svdllm")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert expected in errors[0], errors[0]
    return errors[0]


def _no_leftovers(tmp: Path, before: set[str]) -> None:
    assert not (tmp / "out").exists()
    left = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*")} - before
    assert not left, f"left behind: {sorted(left)}"
    assert not [p for p in tmp.rglob(".*") if ".tmp-" in p.name]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tiny_dir, svd_dir, tmp_path, capsys, monkeypatch):
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
    code = main([_fill(a, values) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.out == ""
    _check_one_error_line(captured.err, _fill(expected, values))
    _no_leftovers(tmp_path, before)


@pytest.mark.parametrize("case", ARG_CASES, ids=[c[0] for c in ARG_CASES])
def test_bad_argument(case, capsys):
    _, argv, expected = case
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = _check_one_error_line(captured.err, expected)
    assert line.endswith("--help`")


def test_hub_unreachable_fails_fast(tiny_dir, capsys, monkeypatch):
    """A hub model or dataset with no network: one line that names the unreachable endpoint."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    for argv, expected in (
        (["eval", "no-org/no-model"], "model 'no-org/no-model' is not a local folder and the hub "),
        (
            ["eval", str(tiny_dir), "--dataset", "no-org/no-data"],
            "dataset 'no-org/no-data' is not a local file",
        ),
    ):
        assert main(argv) == 2
        line = _check_one_error_line(capsys.readouterr().err, expected)
        assert "http://127.0.0.1:9 is unreachable" in line


def test_interrupt_while_loading_is_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    import svdllm_plugin.checkpoint

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(svdllm_plugin.checkpoint, "load_pretrained", interrupt)
    assert main(["compress", "--model", str(tiny_dir), "--output", str(tmp_path / "out"), *FAST]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "svdllm compress: interrupted; no output was written"
    )
    assert list(tmp_path.iterdir()) == []


def test_unexpected_error_points_to_debug(tiny_dir, capsys, monkeypatch):
    """A bug (not a bad input) still ends in one line, which says how to see the traceback."""
    import svdllm_plugin.evaluate

    def broken(*args, **kwargs):
        return None.shape  # AttributeError

    monkeypatch.setattr(svdllm_plugin.evaluate, "perplexity", broken)
    argv = ["eval", str(tiny_dir), "--seq-len", "16", "--max-windows", "1"]
    assert main(argv) == 2
    _check_one_error_line(
        capsys.readouterr().err,
        "AttributeError: 'NoneType' object has no attribute 'shape' "
        "(unexpected; rerun with --debug for the traceback)",
    )
    assert main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
        "svdllm eval"
    )
    monkeypatch.setenv("SVDLLM_DEBUG", "1")
    assert main(argv) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
