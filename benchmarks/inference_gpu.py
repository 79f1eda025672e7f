"""GPU inference speed of SmolLM2-shaped models: dense vs factorized at several ratios.

Speed does not depend on the weights' values, so this builds SmolLM2-135M's architecture
from its hyperparameters with random weights, and factorized variants with the ranks
`svdllm compress` gives at each ratio (k = floor(m n (1 - r) / (m + n))), random factors.
It needs only torch + transformers (the plugin's package __init__, which imports
llmcompressor, is bypassed), so it runs on a bare GPU machine:

    python benchmarks/inference_gpu.py --out results.json   # bf16, CUDA events
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
package = types.ModuleType("svdllm_plugin")  # submodules without the package __init__ (llmcompressor)
package.__path__ = [str(ROOT / "svdllm_plugin")]
sys.modules.setdefault("svdllm_plugin", package)

from svdllm_plugin.bench import Variant, benchmark, format_table, plot  # noqa: E402
from svdllm_plugin.inference import enable_latent_kv_cache, fuse_shared_inputs  # noqa: E402
from svdllm_plugin.layers import SVDLinear, replace_module  # noqa: E402


def smollm2(dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def factorized(ratio: float, dtype, device):
    model = smollm2(dtype, device)
    for name, linear in list(model.named_modules()):
        if isinstance(linear, torch.nn.Linear) and ".layers." in name:
            m, n = linear.weight.shape
            k = int(m * n * (1 - ratio) / (m + n))
            layer = SVDLinear(n, m, k, bias=False, device=device, dtype=dtype)
            torch.nn.init.normal_(layer.svd_u.weight, std=0.02)
            torch.nn.init.normal_(layer.svd_v.weight, std=0.02)
            replace_module(model, name, layer)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--prefill", default="1x512,8x512,1x2048")
    parser.add_argument("--contexts", default="128,1024,4096")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    device, dtype = "cuda", torch.bfloat16
    variants = [Variant("dense", smollm2(dtype, device))]
    for ratio in (0.2, 0.4, 0.6, 0.8):
        variants.append(
            Variant(f"r{ratio}", fuse_shared_inputs(factorized(ratio, dtype, device)), notes=["fused"])
        )
    variants.append(Variant("r0.4-unfused", factorized(0.4, dtype, device)))
    model, make_cache = enable_latent_kv_cache(fuse_shared_inputs(factorized(0.4, dtype, device)))
    variants.append(Variant("r0.4-latent", model, make_cache, ["fused", "latent KV cache"]))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.prefill.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    results = benchmark(variants, shapes, contexts, args.decode_tokens, args.repeats, 2, device)
    results["dtype"] = str(dtype)
    table = format_table(results)
    print(table)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
