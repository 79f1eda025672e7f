"""The byte-budget search (`svdllm compress --target-bits / --target-size`); its splits: tests/data/.

Bad budgets fail in one line before any weights load and leave nothing behind; the search never
writes a model over budget, even when a candidate's predicted size is wrong.
"""

import json

import pytest
import torch

from svdllm_plugin.cli import main
from svdllm_plugin.search import Budget, Candidate, parse_budget, search

FAST = ["--num-samples", "2", "--seq-len", "16", "--eval-windows", "1"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--target-bits", "-1"], "--target-bits must be a number > 0"),
        (["--target-bits", "abc"], "--target-bits must be a number > 0"),
        (["--target-bits", "nan"], "--target-bits must be a number > 0"),
        (["--target-size", "12XB"], "--target-size must be a size > 0 like 120, 120MB"),
        (["--target-size=-5MB"], "--target-size must be a size > 0 like 120, 120MB"),
        (["--target-size", "0"], "--target-size must be > 0 bytes"),
        (
            ["--target-bits", "0.5"],
            "too small for any candidate: the smallest candidate (GPTQ W2 g64) needs 2.274 bits",
        ),
        (["--target-size", "1KB"], "too small for any candidate"),
        (["--target-bits", "4", "--recipe", "r.yaml"], "--recipe and a budget"),
        (["--target-bits", "4", "--eval-windows", "0"], "--eval-windows must be >= 1 with a budget"),
        (["--target-bits", "4", "--target-size", "5MB"], "not allowed with argument"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_bad_budgets_are_one_line_errors_that_leave_nothing(tiny_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    flags = [str(tmp_path / f) if f == "r.yaml" else f for f in flags]
    argv = ["compress", "--model", str(tiny_dir), "--output", str(out), *FAST, *flags]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors (two budgets) exit from the parser
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_parse_budget_units():
    assert parse_budget(target_size="120") == Budget(bytes=120_000_000)
    assert parse_budget(target_size="0.5 GB") == Budget(bytes=500_000_000)
    assert parse_budget(target_size="2MiB") == Budget(bytes=2 * 2**20)
    assert parse_budget(target_bits="3.5") == Budget(bits=3.5)


def test_search_never_returns_a_model_over_budget(tiny_dir, tmp_path):
    """Budget 5 bits: W8 is skipped before running, a candidate whose prediction lies (W8 said to be
    3.3 bits) runs and is rejected once measured, and the winner (chosen on validation) fits."""
    from svdllm_plugin.checkpoint import load_pretrained
    from svdllm_plugin.checkpoint.bits import checkpoint_bits

    liar = Candidate(8, 64, extra_bits=-5.0)
    candidates = [Candidate(8, 64), liar, Candidate(4, 64), Candidate(2, 64)]
    report, trials = search(
        str(tiny_dir),
        str(tmp_path / "out"),
        Budget(bits=5.0),
        candidates,
        num_samples=4,
        seq_len=32,
        eval_windows=2,
    )
    status = {id(t.candidate): t.status for t in trials}
    assert status[id(candidates[0])] == "skipped: predicted over budget"
    assert status[id(liar)] == "over budget (measured)"
    assert sorted(status.values()).count("chosen") == 1
    chosen = next(t for t in trials if t.status == "chosen")
    others = [t for t in trials if t.status == "ok"]
    assert all(chosen.ppl_validation <= t.ppl_validation for t in others)
    size = checkpoint_bits(tmp_path / "out")
    assert size["decoder_linear_bits"] <= 5.0 and size == report.size
    record = json.loads((tmp_path / "out" / "config.json").read_text())["svdllm"]
    assert record["budget"] == "5 bits per decoder-Linear weight" and len(record["search"]) == 4
    assert (tmp_path / "out" / "recipe.yaml").read_text() == chosen.candidate.recipe()
    assert report.eval_split == "test" and report.ppl_after is not None
    assert load_pretrained(tmp_path / "out")(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_search_by_size_through_the_cli(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", "--model", str(tiny_dir), "--output", str(out), "--target-size", "6.33MB"]
    assert main([*argv, "--num-samples", "2", "--seq-len", "16", "--eval-windows", "1"]) == 0
    text = capsys.readouterr().out
    assert "chosen" in text and "validation ppl" in text and "test split" in text
    config = json.loads((out / "config.json").read_text())
    assert config["svdllm"]["size"]["safetensors_bytes"] <= 6_330_000
