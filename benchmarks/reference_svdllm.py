"""Differential check: our SVDLLMModifier against a plain-torch re-implementation of SVD-LLM.

The reference below follows the paper's code (AIoT-MLSys-lab/SVD-LLM, ``profle_svdllm`` +
``whitening`` in SVDLLM.py) and imports nothing from svdllm_plugin: hooks on every Linear of the
decoder layers of the ORIGINAL dense model accumulate H = sum X^T X over one whole-model
forward of the calibration set; then per Linear S = cholesky(H), SVD of W S, keep the top
k = floor(m n (1 - r) / (m + n)), W_u = U_k Sigma_k^1/2, W_v = Sigma_k^1/2 V_k^T S^-1.
(The paper's code sums X^T X in float32 and runs the SVD in float32; here every step is
float64, so the check isolates algorithmic differences from rounding.)

Both paths get the same calibration windows and the same held-out windows; the script
prints dense / reference / plugin perplexity, and the relative Frobenius difference of
W_u W_v between the two for every factorized module.

    .venv/bin/python benchmarks/reference_svdllm.py            # ratio 0.2, SmolLM2-135M
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "reference_svdllm.json"


# ---------------------------------------------------------------- the reference algorithm


def _decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers (so never lm_head)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"}


@torch.no_grad()
def gram_matrices(model: nn.Module, samples: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """H = sum over calibration tokens of x x^T (n, n), float64, per decoder Linear."""
    linears = _decoder_linears(model)
    H = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}

    def hook(name):
        def accumulate(module, args):
            X = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)  # (tokens, n)
            H[name] += X.T @ X

        return accumulate

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        model.eval()
        for start in range(0, samples.shape[0], batch_size):
            model(input_ids=samples[start : start + batch_size])  # whole model, original weights
    finally:
        for h in handles:
            h.remove()
    return H


def svdllm_factors(W: torch.Tensor, H: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_u (m, k), W_v (k, n)) in float64, as the reference ``whitening`` computes them."""
    m, n = W.shape
    H = H.to(torch.float64)
    try:
        S = torch.linalg.cholesky(H)  # (n, n) lower
    except torch.linalg.LinAlgError:  # the reference: shift by -lambda_min + 1e-6 and retry
        lambda_min = torch.linalg.eigvalsh(H)[0]
        S = torch.linalg.cholesky(H + (-lambda_min + 1e-6) * torch.eye(n, dtype=H.dtype))
    try:
        S_inv = torch.linalg.inv(S)
    except torch.linalg.LinAlgError:
        S_inv = torch.linalg.inv(S + 1e-6 * torch.eye(n, dtype=S.dtype))
    U, sigma, Vh = torch.linalg.svd(W.to(torch.float64) @ S, full_matrices=False)
    k = int(m * n * (1 - ratio) / (m + n))
    root = sigma[:k].sqrt()
    return U[:, :k] * root, (root[:, None] * Vh[:k]) @ S_inv  # (m, k), (k, n)


def reference_svdllm(model: nn.Module, samples: torch.Tensor, ratio: float, batch_size: int = 4) -> dict:
    """Compress ``model`` in place: each decoder Linear becomes Sequential(W_v, W_u).

    ``samples`` is a LongTensor (N, L) of calibration token ids. Returns the seconds spent
    collecting statistics and decomposing.
    """
    start = time.perf_counter()
    grams = gram_matrices(model, samples, batch_size)
    collected = time.perf_counter()
    for name, linear in _decoder_linears(model).items():
        W_u, W_v = svdllm_factors(linear.weight, grams.pop(name), ratio)
        k = W_v.shape[0]
        v = nn.Linear(linear.in_features, k, bias=False, dtype=linear.weight.dtype)
        u = nn.Linear(k, linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)
        v.weight.data.copy_(W_v)
        u.weight.data.copy_(W_u)
        if linear.bias is not None:
            u.bias.data.copy_(linear.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Sequential(v, u))
    return {"statistics_s": collected - start, "decompose_s": time.perf_counter() - collected}


def reference_product(module: nn.Sequential) -> torch.Tensor:
    v, u = module
    return u.weight.double() @ v.weight.double()  # (m, n)


# ---------------------------------------------------------------- the comparison


def plugin_svdllm(model, tokenizer, calib, ratio: float) -> None:
    from llmcompressor import oneshot

    import svdllm_plugin  # noqa: F401  (registers SVDLLMModifier)

    # the `*_stage:` / `*_modifiers:` nesting is required: a bare `SVDLLMModifier: {...}`
    # parses to a recipe without modifiers, and oneshot then silently does nothing
    recipe = (
        f"svd_stage:\n  svd_modifiers:\n    SVDLLMModifier:\n"
        f"      ratio: {ratio}\n      activations: original\n"
    )
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=calib,
        recipe=recipe,
        num_calibration_samples=len(calib),
        max_seq_length=len(calib[0]["input_ids"]),
    )


def factor_differences(reference, plugin) -> dict[str, float]:
    """||W'_ref - W'_ours||_F / ||W'_ref||_F per factorized module."""
    from svdllm_plugin.layers import SVDLinear

    ours = {n: m for n, m in plugin.named_modules() if isinstance(m, SVDLinear)}
    diffs = {}
    for name, module in reference.named_modules():
        if isinstance(module, nn.Sequential) and name in ours:
            ref = reference_product(module)
            mine = ours[name].dense().double()
            diffs[name] = ((ref - mine).norm() / ref.norm()).item()
    return diffs


def table(results: dict) -> str:
    rows = [
        ("dense", results["ppl_dense"], results["seconds_dense_ppl"], ""),
        ("reference (plain torch)", results["ppl_reference"], results["seconds_reference"], ""),
        (
            "plugin (oneshot)",
            results["ppl_plugin"],
            results["seconds_plugin"],
            f"{results['relative_difference']:+.3%}",
        ),
    ]
    lines = ["| model | perplexity | time (s) | plugin / reference - 1 |", "|---|---|---|---|"]
    lines += [f"| {name} | {ppl:.4f} | {secs:.1f} | {rel} |" for name, ppl, secs, rel in rows]
    lines.append("\ntime: dense = the perplexity evaluation; reference, plugin = statistics + decomposition")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)

    from svdllm_plugin.data import calibration_dataset, eval_windows, load_text
    from svdllm_plugin.evaluate import perplexity
    from svdllm_plugin.models import load_model_and_tokenizer

    torch.manual_seed(args.seed)
    dense, tokenizer = load_model_and_tokenizer(args.model)
    calib_text, eval_text = load_text(None, "calibration"), load_text(None, "evaluation")
    calib = calibration_dataset(tokenizer, calib_text, args.num_samples, args.seq_len, seed=args.seed)
    windows = eval_windows(tokenizer, eval_text, args.seq_len, args.eval_windows)
    samples = torch.tensor(calib["input_ids"])  # (N, L), the very windows oneshot gets

    start = time.perf_counter()
    ppl_dense = perplexity(dense, windows, desc="Perplexity dense")
    seconds_dense = time.perf_counter() - start

    start = time.perf_counter()
    timing = reference_svdllm(dense, samples, args.ratio)  # `dense` is now the reference model
    seconds_reference = time.perf_counter() - start
    ppl_reference = perplexity(dense, windows, desc="Perplexity reference")

    plugin, _ = load_model_and_tokenizer(args.model)
    start = time.perf_counter()
    plugin_svdllm(plugin, tokenizer, calib, args.ratio)
    seconds_plugin = time.perf_counter() - start
    ppl_plugin = perplexity(plugin, windows, desc="Perplexity plugin")

    diffs = factor_differences(dense, plugin)
    shown = [n for n in diffs if n.startswith(("model.layers.0.", "model.layers.15.", "model.layers.29."))]
    results = dict(
        model=args.model,
        ratio=args.ratio,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        eval_windows=int(windows.shape[0]),
        seed=args.seed,
        ppl_dense=ppl_dense,
        ppl_reference=ppl_reference,
        ppl_plugin=ppl_plugin,
        relative_difference=ppl_plugin / ppl_reference - 1,
        seconds_dense_ppl=seconds_dense,
        seconds_reference=seconds_reference,
        seconds_reference_statistics=timing["statistics_s"],
        seconds_reference_decompose=timing["decompose_s"],
        seconds_plugin=seconds_plugin,
        modules_compared=len(diffs),
        factor_rel_frobenius_max=max(diffs.values(), default=math.nan),
        factor_rel_frobenius_median=sorted(diffs.values())[len(diffs) // 2] if diffs else math.nan,
        factor_rel_frobenius=diffs,
    )
    print(table(results))
    worst, median = results["factor_rel_frobenius_max"], results["factor_rel_frobenius_median"]
    print(
        f"\nW_u W_v, relative Frobenius difference (reference vs plugin), {len(diffs)} modules: "
        f"max {worst:.2e}, median {median:.2e}"
    )
    print("| module | rel. Frobenius diff |\n|---|---|")
    for name in shown:
        print(f"| {name} | {diffs[name]:.2e} |")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {output}")
    return results


if __name__ == "__main__":
    main()
