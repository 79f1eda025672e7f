"""`svdllm bench` on tiny models: the command runs, prints its tables, JSON and plot."""

from __future__ import annotations

import json

import pytest
import torch
from support.factors import factorize_ratio as factorize

from svdllm_plugin.bench import format_table
from svdllm_plugin.checkpoint import save_pretrained
from svdllm_plugin.cli import main


@pytest.fixture(scope="module")
def tiny_svd_dir(tiny_factory, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny-svd"
    save_pretrained(factorize(tiny_factory(), ratio=0.4), path, tokenizer)
    return path


def test_bench_smoke(tiny_dir, tiny_svd_dir, tmp_path, capsys):
    png = tmp_path / "bench.png"  # given without its suffix: the name matplotlib writes is reported
    argv = [
        "bench",
        str(tiny_svd_dir),
        "--baseline",
        str(tiny_dir),
        "--latent-cache",
        "--prefill",
        "1x16,2x8",
        "--contexts",
        "16,32",
        "--decode-tokens",
        "2",
        "--repeats",
        "2",
        "--threads",
        "1",
        "--json",
        "--plot",
        str(tmp_path / "bench"),
    ]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    results = json.loads(captured.out)  # with --json, stdout is the JSON alone
    assert f"plot written to {png}" in captured.err
    table = format_table(results)
    assert "decode @32 tok/s" in table and "FLOP ratio" in table and "KV cache bytes/token" in table
    assert [len(r["per_model"]) for r in results["prefill"]] == [2, 2]
    base, svd = results["decode"][1]["per_model"]
    assert svd["kv_bytes_per_token"] < 0.7 * base["kv_bytes_per_token"]  # latent cache
    assert results["models"][1]["weight_bytes"] < results["models"][0]["weight_bytes"]
    assert all(p["tokens_per_s"] > 0 for r in results["decode"] for p in r["per_model"])
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize(
    "flags, message",
    [(["--prefill", "1by16"], "BATCHxLENGTH"), (["--contexts", "0"], "positive integers")],
)
def test_bench_rejects_bad_shapes(tiny_dir, flags, message, capsys):
    assert main(["bench", str(tiny_dir), *flags]) == 2
    assert message in capsys.readouterr().err
