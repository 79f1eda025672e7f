"""Sweep GPTQ alone vs GPTQ + LowRankCompensationModifier on SmolLM2-135M (docs/stacking.md).

One process: the dense model's perplexities once, then per configuration a fresh model, oneshot
(the pipeline the CLI chooses), perplexity on validation / test / other-domain windows, and the
safetensors bytes of ``checkpoint.save_pretrained``. One JSON line per configuration.

    OMP_NUM_THREADS=1 python benchmarks/compensation_sweep.py --out results.jsonl gptq_w3_g64 w3g192_c4

A configuration name is ``w<bits>g<group>`` (GPTQ alone) or ``w<bits>g<group>_<comp>`` with
<comp> a key of COMPENSATION. Windows: the embedded evaluation text's evenly spread windows,
even ones validation, odd ones test; other domain: license prose (``data.other_domain_text``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

# extra bits per weight a group-192 model may add and still be no larger than group 64:
# its scales cost 32/192 instead of 32/64 bits per weight (fp32 save); a little is left for headers
SPARE_G192 = 0.32
COMPENSATION = {
    "c4": dict(extra_bits=SPARE_G192, factor_bits=4, budget_dtype_bits=32),
    "c8": dict(extra_bits=SPARE_G192, factor_bits=8, budget_dtype_bits=32),
    "c4r2": dict(extra_bits=SPARE_G192, factor_bits=4, budget_dtype_bits=32, rounds=2),
    "c4b1": dict(extra_bits=0.98, factor_bits=4, budget_dtype_bits=32),  # W2 g64 + 1 bit = W3 g64
    "c4b1r2": dict(extra_bits=0.98, factor_bits=4, budget_dtype_bits=32, rounds=2),
    "c4b05": dict(extra_bits=0.49, factor_bits=4, budget_dtype_bits=32),
    # bf16 saving: group-192 scales free only 16/64 - 16/192 = 0.167 bits per weight; this budget keeps
    # the stack no larger than group 64 in both fp32 and bf16 files
    "c4h": dict(extra_bits=0.16, factor_bits=4),
}


def recipe(name: str) -> str:
    match = re.fullmatch(r"w(\d)g(\d+)(?:_(\w+))?", name)
    if match is None:
        raise ValueError(f"configuration {name!r}: expected w<bits>g<group>[_<comp>]")
    bits, group, comp = int(match[1]), int(match[2]), match[3]
    text = f"""quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: ["re:.*lm_head"]
      config_groups:
        group_0:
          targets: ["Linear"]
          weights: {{num_bits: {bits}, type: int, symmetric: true, strategy: group, group_size: {group}}}
"""
    if comp:
        settings = dict(targets=["Linear"], ignore=["re:.*lm_head"], **COMPENSATION[comp])
        text += f"    LowRankCompensationModifier: {json.dumps(settings)}\n"
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=6, help="in-domain windows (half validation)")
    parser.add_argument("--other-windows", type=int, default=3)
    args = parser.parse_args()

    from llmcompressor import oneshot
    from llmcompressor.recipe import Recipe

    from svdllm_plugin import register_modifiers
    from svdllm_plugin.checkpoint import save_pretrained
    from svdllm_plugin.compress import pipeline_for
    from svdllm_plugin.data import calibration_dataset, load_text, other_domain_text, spread_windows
    from svdllm_plugin.evaluate import perplexity
    from svdllm_plugin.models import load_model_and_tokenizer, resolve_model_path

    register_modifiers()
    path = resolve_model_path("smollm2-135m")
    model, tokenizer = load_model_and_tokenizer(path, check=False)
    calib = calibration_dataset(tokenizer, load_text(None, "calibration"), args.num_samples, args.seq_len)
    spread = spread_windows(tokenizer, load_text(None, "evaluation"), args.seq_len, args.windows)
    windows = {"val": spread[0::2], "test": spread[1::2]}
    windows["other"] = spread_windows(tokenizer, other_domain_text(), args.seq_len, args.other_windows)

    def evaluate(model) -> dict:
        return {k: perplexity(model, w, progress=False) for k, w in windows.items()}

    out = Path(args.out)
    for name in args.configs:
        start = time.perf_counter()
        if name == "dense":
            row = dict(name=name, **evaluate(model))
        else:
            model, _ = load_model_and_tokenizer(path, check=False)
            text = recipe(name)
            oneshot(
                model=model,
                processor=tokenizer,
                dataset=calib,
                recipe=text,
                num_calibration_samples=len(calib),
                max_seq_length=args.seq_len,
                pipeline=pipeline_for(Recipe.create_instance(text).modifiers),
            )
            row = dict(name=name, **evaluate(model))
            folder = Path(tempfile.mkdtemp(prefix="sweep-")) / name
            save_pretrained(model, folder, tokenizer)
            row["bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            shutil.rmtree(folder.parent)
        row["seconds"] = round(time.perf_counter() - start, 1)
        print("RESULT", json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
