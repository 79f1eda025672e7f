"""Every bad input of the `svdllm` command: a non-zero exit, one error line on stderr that names
the file or option and the fix, no traceback, and nothing left behind (no output, no temp folder).

The tables' rows run in-process through ``svdllm_plugin.cli.main`` (harness:
tests/support/cli_errors.py); bad output folders, recipes and datasets: test_input_errors.py.
"""

from __future__ import annotations

import pytest
from support.cli_errors import (
    BERT,
    FAST,
    LLAMA_ONLY,
    T5,
    Case,
    D,
    R,
    check_bad_input,
    check_one_error_line,
    compress,
    edit_ranks,
    garble_header,
    missing_shard,
    recipe,
    truncate,
)

from svdllm_plugin.cli import main

# placeholders: {tiny} dense tiny Llama folder, {svd} a compressed one, {tmp} the row's tmp_path,
# {out} = {tmp}/out (must not exist afterwards), {model} = {tmp}/model (made by ``edit``)
CASES = [
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
        edit=("tiny", truncate),
    ),
    Case(
        "model-garbled-header",
        compress(model="{model}"),
        "{model}/model.safetensors is truncated or corrupted",
        edit=("tiny", garble_header),
    ),
    Case(
        "model-missing-shard",
        compress(model="{model}"),
        "checkpoint file {model}/model-00002-of-00002.safetensors is missing",
        edit=("tiny", missing_shard),
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
        edit=("svd", truncate),
    ),
    Case(
        "eval-unknown-ranks",
        ["eval", "{model}"],
        "lists 'model.layers.5.self_attn.q_proj' under svdllm.ranks, but the model has no such module",
        edit=("svd", edit_ranks),
    ),
    Case(
        "eval-bad-rank",
        ["eval", "{model}"],
        "must be a positive integer; got 0",
        edit=("svd", lambda f: edit_ranks(f, "model.layers.0.self_attn.q_proj", 0)),
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
        edit=("tiny", truncate),
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


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tiny_dir, svd_dir, tmp_path, capsys, monkeypatch):
    check_bad_input(case, tiny_dir, svd_dir, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("case", ARG_CASES, ids=[c[0] for c in ARG_CASES])
def test_bad_argument(case, capsys):
    _, argv, expected = case
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = check_one_error_line(captured.err, expected)
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
        line = check_one_error_line(capsys.readouterr().err, expected)
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
    check_one_error_line(
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
