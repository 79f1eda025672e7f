"""`svdllm compress` / `svdllm eval` on the tiny model (bad inputs: test_cli_errors.py)."""

import json
import os

import pytest
import torch

from svdllm_plugin.checkpoint import load_pretrained
from svdllm_plugin.cli import main

FAST = ["--num-samples", "4", "--seq-len", "32", "--eval-windows", "2"]


def write_recipe(tmp_path, body: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(body)
    return str(path)


def svd_recipe(tmp_path, **settings) -> str:
    lines = "".join(f"      {k}: {v}\n" for k, v in {"ratio": 0.3, **settings}.items())
    return write_recipe(tmp_path, f"svd_stage:\n  svd_modifiers:\n    SVDLLMModifier:\n{lines}")


def test_compress_then_eval_json(tiny_dir, tmp_path, capsys):
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
    assert load_pretrained(out) is not None


def test_interrupted_run_leaves_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    import llmcompressor

    def interrupt(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llmcompressor, "oneshot", interrupt)
    out = tmp_path / "out"
    assert main(["compress", "--model", str(tiny_dir), "--output", str(out), *FAST]) == 130
    assert not out.exists() and os.listdir(tmp_path) == []


def test_saving_twice_with_overwrite_replaces_atomically(tmp_path):
    from svdllm_plugin.atomic import atomic_output_dir

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


def test_eval_on_dense_model_json(tiny_dir, capsys):
    assert main(["eval", str(tiny_dir), "--seq-len", "16", "--max-windows", "1", "--json"]) == 0
    assert torch.isfinite(torch.tensor(json.loads(capsys.readouterr().out.splitlines()[-1])["perplexity"]))


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
