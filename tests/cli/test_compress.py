"""`svdllm compress` on the tiny model, its report and folder read back by `svdllm eval` (bad inputs:
test_contract.py)."""

import json
import os

import pytest
from support import svd_recipe

from svdllm_plugin.checkpoint import load_pretrained
from svdllm_plugin.cli import main
from svdllm_plugin.data import eval_windows, load_text
from svdllm_plugin.evaluate import perplexity
from svdllm_plugin.layers import factorized_ranks

FAST = ["--num-samples", "4", "--seq-len", "32", "--eval-windows", "2"]


def test_compress_then_eval_json(tiny_dir, tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "compress",
                "--model",
                str(tiny_dir),
                "--recipe",
                svd_recipe(tmp_path),
                "--output",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "params (targeted)" in table and "held-out perplexity" in table and str(out) in table
    other = next(line for line in table.splitlines() if "other-domain perplexity" in line)
    before, after = (float(cell) for cell in other.split("|")[2:4])  # measured on license prose
    assert before > 1 and after > 1
    config = json.loads((out / "config.json").read_text())
    assert config["svdllm"]["ppl_other_after"] == pytest.approx(after, abs=1e-3)
    assert len(config["svdllm"]["ranks"]) == 14
    assert main(["eval", str(out), "--seq-len", "32", "--max-windows", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["perplexity"] > 1 and result["windows"] == 2
    assert factorized_ranks(load_pretrained(out)) == config["svdllm"]["ranks"]
    windows = eval_windows(tokenizer, load_text(None, "evaluation"), 32, 2)
    again = perplexity(load_pretrained(out), windows, progress=False)  # the folder as the library reads it
    assert again == pytest.approx(result["perplexity"], rel=1e-9)


def test_interrupted_run_leaves_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    import llmcompressor

    def interrupt(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llmcompressor, "oneshot", interrupt)
    out = tmp_path / "out"
    assert main(["compress", "--model", str(tiny_dir), "--output", str(out), *FAST]) == 130
    assert not out.exists() and os.listdir(tmp_path) == []
