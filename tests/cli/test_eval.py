"""`svdllm eval`: perplexity of a dense folder against a hand computation, and the offline lm-eval
task on a compressed folder."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from support import svd_recipe
from transformers import AutoModelForCausalLM

from svdllm_plugin.cli import main
from svdllm_plugin.data import eval_windows, load_text

FAST = ["--num-samples", "4", "--seq-len", "32", "--eval-windows", "2"]


def test_eval_on_dense_model_json(tiny_dir, tokenizer, capsys):
    """The perplexity printed is exp(mean next-token NLL) of the dense model on the first window."""
    assert main(["eval", str(tiny_dir), "--seq-len", "16", "--max-windows", "1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    windows = eval_windows(tokenizer, load_text(None, "evaluation"), 16, 1)  # (1, 16)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_dir)(windows).logits[0, :-1]  # (15, V)
    nll = F.cross_entropy(logits.double(), windows[0, 1:])
    assert printed["windows"] == 1 and printed["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_eval_runs_the_offline_lm_eval_task_on_a_compressed_folder(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", "--model", str(tiny_dir), "--recipe", svd_recipe(tmp_path), "--output", str(out)]
    assert main([*argv, *FAST]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", "svdllm_embedded", "--limit", "2", "--json"]) == 0
    printed = capsys.readouterr().out
    assert "svdllm_embedded" in printed and "word_perplexity" in printed and "bits_per_byte" in printed
    results = json.loads(printed.strip().splitlines()[-1])["results"]["svdllm_embedded"]
    assert results["bits_per_byte,none"] > 0
