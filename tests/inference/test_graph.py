"""Graph-captured decode, the synthetic benchmark and the low-rank kernel, on tiny random models.

The graph regime is compiled with torch.compile's "eager" backend here: dynamo captures the
same single graph over the static cache as inductor would (inductor itself takes about a
minute per model to generate code on a small CPU; the greedy tokens were checked identical
with it by hand, docs/inference.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from support import REPO

from svdllm_plugin.bench.synthetic import build_dense, decoder_parameters, factorize_uniform, synthetic_config
from svdllm_plugin.cli import main
from svdllm_plugin.inference import enable_graph_decode, fuse_shared_inputs, greedy_tokens
from svdllm_plugin.inference.triton_lowrank import (
    LowRankKernelLinear,
    available,
    disable_lowrank_kernel,
    enable_lowrank_kernel,
    lowrank_linear,
)

TINY = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
    initializer_range=0.3,  # large logits: greedy tokens vary (at 0.02 every step repeats one token)
)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "config.json"
    path.write_text(json.dumps(TINY))
    return path


def _models(config_path):
    config = synthetic_config(str(config_path))
    dense = build_dense(config, torch.float32, "cpu")
    factorized = build_dense(config, torch.float32, "cpu")
    ranks = factorize_uniform(factorized, 0.4, rank_multiple=8)
    assert len(ranks) == 7  # every decoder-layer Linear
    return dense, factorized


@pytest.mark.parametrize("kind", ["dense", "factorized", "factorized-fused", "plugin-svdlinear"])
def test_graph_decode_gives_eager_tokens(tiny_config, kind):
    dense, factorized = _models(tiny_config)
    model = dense if kind == "dense" else factorized
    if kind == "plugin-svdlinear":  # layers.SVDLinear (what `svdllm generate` loads), truncated SVD
        from support.factors import factorize_ratio

        model = factorize_ratio(dense, 0.4)
    if kind.endswith("fused"):
        fuse_shared_inputs(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))
    eager = greedy_tokens(model, ids, 6, "eager")
    graph = greedy_tokens(model, ids, 6, "graph", backend="eager")
    assert hasattr(model, "_compiled_call")  # the step went through torch.compile
    assert len(set(eager.flatten().tolist())) > 2  # a real sequence, not one token repeated
    assert torch.equal(graph, eager)


def test_generate_with_graph_decode(tiny_config):
    _, model = _models(tiny_config)
    ids = torch.randint(0, TINY["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        eager = model.generate(ids, max_new_tokens=5, do_sample=False)
        enable_graph_decode(model, backend="eager")
        graph = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert model.generation_config.cache_implementation == "static"
    assert hasattr(model, "_compiled_call")  # transformers compiled the decoding forward
    assert torch.equal(graph, eager)


def test_runtime_option_decode(tiny_config):
    from svdllm_plugin.checkpoint.svdllm_runtime import apply_runtime_options

    _, model = _models(tiny_config)
    apply_runtime_options(model, {"decode": "eager"})
    assert model.generation_config.cache_implementation is None
    apply_runtime_options(model, {"decode": "graph"})
    assert model.generation_config.cache_implementation == "static"
    with pytest.raises(ValueError, match="decode must be 'eager' or 'graph'"):
        apply_runtime_options(model, {"decode": "fast"})
    with pytest.raises(ValueError, match="set only one of them"):  # before any work is done
        apply_runtime_options(model, {"decode": "graph", "latent_kv_cache": True})


def test_bench_synthetic_json(tiny_config, capsys):
    argv = [
        "bench",
        "--synthetic",
        str(tiny_config),
        "--ratios",
        "0.4",
        "--decode",
        "eager,graph,graph-kernel",
        "--device",
        "cpu",
        "--json",
        "--compile-backend",
        "eager",
        "--rank-multiple",
        "8",
        "--contexts",
        "8",
        "--prefill",
        "1x8",
        "--decode-tokens",
        "3",
        "--repeats",
        "1",
        "--warmup",
        "0",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "graph-kernel skipped: it needs CUDA and Triton" in err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    rows = json.loads(lines[0])["rows"]
    assert {(r["ratio"], r["regime"]) for r in rows} == {
        (ratio, regime) for ratio in (0.0, 0.4) for regime in ("prefill", "eager", "graph")
    }
    for r in rows:
        assert r["time_vs_dense"] > 0 and 0 < r["param_ratio"] <= 1
        assert ("same_tokens" in r) == (r["regime"] == "graph")
        assert ("read_ratio" in r) == (r["regime"] != "prefill")
    assert all(r["same_tokens"] for r in rows if r["regime"] == "graph")
    assert next(r for r in rows if r["ratio"] == 0.4)["param_ratio"] == pytest.approx(0.6, abs=0.05)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--synthetic", "llama-70b"], "--synthetic takes one of"),
        (["--synthetic", "llama-7b", "--ratios", "40"], "--ratios takes fractions in (0, 1)"),
        (["--synthetic", "llama-7b", "--decode", "eager,fast"], "--decode takes regimes of"),
        (["--synthetic", "llama-7b", "--layers", "0"], "--layers must be a positive integer"),
        (["smollm2-135m", "--synthetic", "llama-7b"], "not both nor neither"),
    ],
)
def test_bench_synthetic_rejects(flags, message, capsys):
    assert main(["bench", *flags, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_synthetic_7b_ranks_on_meta():
    """The shapes and ranks of the GPU benchmark, checked without allocating a byte."""
    config = synthetic_config("llama-7b", layers=1)
    dense = build_dense(config, torch.bfloat16, "meta")
    model = build_dense(config, torch.bfloat16, "meta")
    ranks = factorize_uniform(model, 0.4, rank_multiple=64)
    assert len(ranks) == 7 and all(k % 64 == 0 for k in ranks.values())
    assert decoder_parameters(model) / decoder_parameters(dense) == pytest.approx(0.6, abs=0.01)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_lowrank_kernel_swap_keeps_function_and_state(tiny_config):
    _, model = _models(tiny_config)
    ids = torch.randint(0, TINY["vocab_size"], (1, 4))
    keys = set(model.state_dict())
    with torch.inference_mode():
        before = model(ids).logits
        assert enable_lowrank_kernel(model) == 7
        assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankKernelLinear)
        assert set(model.state_dict()) == keys  # the same svd_u / svd_v names
        assert torch.equal(model(ids).logits, before)  # CPU: the torch fallback
        assert disable_lowrank_kernel(model) == 7
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "SVDLinear"


@pytest.mark.skipif(not available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize("m, k, n", [(4096, 320, 4096), (576, 200, 1536)])  # 576: splits not multiples of 64
def test_lowrank_kernel_matches_two_gemms_on_cuda(tokens, m, k, n):
    torch.manual_seed(0)
    V = (torch.randn(k, n, device="cuda") / n**0.5).bfloat16()  # (k, n)
    U = (torch.randn(m, k, device="cuda") / k**0.5).bfloat16()  # (m, k)
    x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    expected = (x.float() @ V.float().T) @ U.float().T
    assert torch.allclose(lowrank_linear(x, V, U).float(), expected, rtol=0.05, atol=0.05)


BARE_GPU_MACHINE = """
import importlib.machinery, sys
import torch, transformers  # what the GPU machine has (their own optional-package checks run first)

class Absent:  # llmcompressor, compressed-tensors, pydantic and loguru are not installed there
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top == "loguru":  # benchmarks/gpu_decode.sh puts its shim on the path
            return importlib.machinery.PathFinder.find_spec(name, ["benchmarks/gpu_shim"])
        if top in ("llmcompressor", "compressed_tensors", "pydantic"):
            raise ModuleNotFoundError(f"No module named {top!r}")

sys.meta_path.insert(0, Absent())
from svdllm_plugin.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_synthetic_bench_runs_with_torch_and_transformers_only(tiny_config):
    """What benchmarks/gpu_decode.sh runs must not need the packages a bare GPU machine lacks."""
    import subprocess
    import sys

    root = REPO
    argv = [
        "bench",
        "--synthetic",
        str(tiny_config),
        "--ratios",
        "0.4",
        "--decode",
        "eager",
        "--device",
        "cpu",
        "--json",
        "--rank-multiple",
        "8",
        "--contexts",
        "8",
        "--prefill",
        "",
        "--decode-tokens",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
    ]
    done = subprocess.run(
        [sys.executable, "-c", BARE_GPU_MACHINE, *argv], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {r["ratio"] for r in json.loads(done.stdout)["rows"]} == {0.0, 0.4}
    assert "llmcompressor" not in done.stderr
