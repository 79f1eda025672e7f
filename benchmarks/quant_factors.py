"""Why quantizing SVD factors costs more than quantizing the dense model: one SVD, many GPTQs.

    .venv/bin/python benchmarks/quant_factors.py [--ratio 0.2] [--bits 4] [--variants split u v ...]

The SVD (SVD-LLM, rank multiple 64 = GPTQ's group) runs once; every variant then quantizes
a copy of the SAME factorized model with GPTQ W{bits} g64, so only the variant differs:
- ``split`` / ``u`` / ``v``: where Sigma sits (the product W_u W_v is the same; the factors
  are re-split: ||W_u[:, i]||^2 = sigma_i under ``split``).
- ``floor``: the old rank rounding (down to a multiple of 64) instead of nearest+rebalance.
- ``qa-SIGMA``: quantization-aware factors: GPTQ quantizes svd_v, FactorRefitModifier (same
  pass) refits W_u on Q(W_v) X, then a second GPTQ quantizes svd_u on the inputs Q(W_v) X.
Writes benchmarks/results/quant_factors.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import markdown, run_recipe, save, setup
from frontier import gptq

from svdllm_plugin import SVDLLMModifier
from svdllm_plugin.layers import SVDLinear
from svdllm_plugin.modifiers.svd import FactorRefitModifier
from svdllm_plugin.modifiers.svd.decompose import rotate_factors
from svdllm_plugin.offload import write_parameter

SMOLLM2_FLOOR = {  # ratios whose exact ranks are the old floor-to-64 ranks at ratio 0.2
    "re:.*(q_proj|o_proj)$": 1 - 192.01 * 1152 / 576**2,
    "re:.*(k_proj|v_proj)$": 1 - 64.01 * 768 / (192 * 576),
    "re:.*(gate_proj|up_proj|down_proj)$": 1 - 320.01 * 2112 / (1536 * 576),
}


def resplit(model: torch.nn.Module, sigma_on: str) -> None:
    """Move Sigma between the factors of every SVDLinear made with sigma 'split'; ``rot-SIGMA``
    also rotates the rank space by a random orthogonal matrix (``rotate_factors``)."""
    rotate = sigma_on.startswith("rot-")
    sigma_on = sigma_on.removeprefix("rot-")
    for layer in model.modules():
        if not isinstance(layer, SVDLinear):
            continue
        W_u, W_v = layer.factors()
        root = W_u.double().norm(dim=0).clamp_min(1e-30)  # sqrt(sigma_i), (k,)
        scale = {"u": root, "v": 1.0 / root, "split": torch.ones_like(root)}[sigma_on]
        W_u, W_v = (W_u.double() * scale).to(W_u.dtype), (W_v.double() / scale[:, None]).to(W_v.dtype)
        if rotate:
            W_u, W_v = rotate_factors(W_u, W_v)
        write_parameter(layer.svd_u, "weight", W_u)
        write_parameter(layer.svd_v, "weight", W_v)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["split", "u", "v", "floor", "qa"])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--name", default="quant_factors")
    parser.add_argument("--no-dense", action="store_true")
    args = parser.parse_args()

    bench = setup(args.model, args.num_samples, args.seq_len, args.eval_windows)
    rows = []
    if not args.no_dense:
        rows.append(dict(variant="dense", ppl=bench.ppl(bench.model), ppl_other=bench.ppl_other(bench.model)))
    svd_models: dict[str, torch.nn.Module] = {}

    def svd_model(key: str, **settings) -> torch.nn.Module:
        if key not in svd_models:
            modifier = SVDLLMModifier(ratio=args.ratio, rank_multiple=64, **settings)
            model, seconds = run_recipe(bench, modifier, propagate_error=modifier.propagates)
            svd_models[key] = model
            rows.append(
                dict(
                    variant=f"SVD only ({key})",
                    achieved_ratio=modifier.achieved_ratio,
                    ppl=bench.ppl(model),
                    ppl_other=bench.ppl_other(model),
                    seconds=seconds,
                )
            )
            print(markdown(rows[-1:], list(rows[-1])), flush=True)
        return svd_models[key]

    for variant in args.variants:
        start = time.perf_counter()
        if variant == "floor":
            model = copy.deepcopy(svd_model("floor", overrides=SMOLLM2_FLOOR))
            recipe = [gptq(args.bits)]
        elif variant.startswith("qa"):  # qa-SIGMA: GPTQ svd_v, refit W_u on Q(W_v) X, GPTQ svd_u
            model = copy.deepcopy(svd_model("nearest"))
            resplit(model, variant.split("-", 1)[1] if "-" in variant else "split")  # qa-v, qa-rot-v
            refit = FactorRefitModifier()
            model, _ = run_recipe(
                bench, [gptq(args.bits, "re:.*svd_v$"), refit], model=model, pipeline="sequential"
            )
            recipe = [gptq(args.bits, "re:.*svd_u$")]
        elif variant.startswith("update-"):  # e.g. update-output: a closed-form update before GPTQ
            model = copy.deepcopy(svd_model(variant, update=variant.split("-", 1)[1]))
            recipe = [gptq(args.bits)]
        else:
            model = copy.deepcopy(svd_model("nearest"))
            resplit(model, variant)
            recipe = [gptq(args.bits)]
        model, _ = run_recipe(bench, recipe, model=model)
        rows.append(
            dict(
                variant=f"{variant} + W{args.bits}",
                ppl=bench.ppl(model),
                ppl_other=bench.ppl_other(model),
                seconds=time.perf_counter() - start,
            )
        )
        print(markdown(rows[-1:], list(rows[-1])), flush=True)
        save(args.name, dict(args=vars(args), rows=rows))
        del model
    table = markdown(rows, ["variant", "achieved_ratio", "ppl", "ppl_other", "seconds"])
    print(table)
    save(args.name, dict(args=vars(args), rows=rows)).with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
