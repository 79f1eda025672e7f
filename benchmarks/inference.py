"""Inference speed and memory of factorized SmolLM2 checkpoints against the dense model.

Models are given as ``name=MODEL[+fuse][+latent]`` (MODEL: 'smollm2-135m' or a folder
written by `svdllm compress`; ``+fuse``: one GEMM per shared-input group; ``+latent``: the
latent KV cache). All of them are measured alternately in one process by
``svdllm_plugin.bench.benchmark``; the first one is the baseline of the ratios.

    python benchmarks/inference.py --tag ratios --threads 1 \\
        --models dense=smollm2-135m r0.2=/tmp/c-smol-0.2+fuse r0.4=/tmp/c-smol-0.4+fuse \\
                 r0.6=/tmp/c-smol-0.6+fuse --prefill 1x128,1x512 --contexts 128,1024

``--check-latent FOLDER`` first compares greedy generation with the latent KV cache against
the ordinary cache on that factorized model (tokens and logits).
Writes benchmarks/results/inference_<tag>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from svdllm_plugin.bench import benchmark, format_table, load_variant, plot
from svdllm_plugin.bench.measure import _ints, _shapes

RESULTS = Path(__file__).resolve().parent / "results"


def parse_model(spec: str):
    name, _, rest = spec.partition("=")
    if not rest:
        raise SystemExit(f"--models takes name=MODEL[+fuse][+latent]; got {spec!r}")
    path, *flags = rest.split("+")
    unknown = set(flags) - {"fuse", "latent"}
    if unknown:
        raise SystemExit(f"unknown flags {sorted(unknown)} in {spec!r} (use +fuse, +latent)")
    return name, path, "fuse" in flags, "latent" in flags


def check_latent(path: str, new_tokens: int) -> dict:
    """Greedy generation from a text prompt: ordinary cache vs latent cache on the same model."""
    from svdllm_plugin.inference import enable_latent_kv_cache, fuse_shared_inputs
    from svdllm_plugin.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path)
    fuse_shared_inputs(model)
    ids = tokenizer("The history of the Roman Empire", return_tensors="pt").input_ids
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.eos_token_id,
    )
    with torch.inference_mode():
        ref = model.generate(ids, **kwargs)
        enable_latent_kv_cache(model)
        out = model.generate(ids, **kwargs)
    ref_logits, logits = torch.stack(ref.logits), torch.stack(out.logits)
    return {
        "model": path,
        "new_tokens": new_tokens,
        "same_tokens": bool(torch.equal(ref.sequences, out.sequences)),
        "max_abs_logit_diff": float((logits - ref_logits).abs().max()),
        "max_abs_logit": float(ref_logits.abs().max()),
        "text": tokenizer.decode(out.sequences[0, ids.shape[1] :])[:200],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", required=True, help="name=MODEL[+fuse][+latent] ...")
    parser.add_argument("--tag", required=True, help="results file suffix")
    parser.add_argument("--prefill", default="1x128,1x512")
    parser.add_argument("--contexts", default="128,1024")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check-latent", default=None, help="factorized folder for the exactness check")
    parser.add_argument("--check-tokens", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    check = check_latent(args.check_latent, args.check_tokens) if args.check_latent else None
    if check:
        print(json.dumps(check))
    variants = []
    for spec in args.models:
        name, path, fuse, latent = parse_model(spec)
        variants.append(load_variant(path, name, "on" if fuse else "off", latent))
    load_avg = Path("/proc/loadavg").read_text().split()[:3]
    results = benchmark(
        variants,
        _shapes(args.prefill),
        _ints(args.contexts, "--contexts"),
        args.decode_tokens,
        args.repeats,
        args.warmup,
    )
    results.update(
        models_spec=args.models,
        latent_check=check,
        seconds=time.time() - start,
        load_average_before=load_avg,
        load_average_after=Path("/proc/loadavg").read_text().split()[:3],
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    table = format_table(results)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"inference_{args.tag}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"inference_{args.tag}.md").write_text(table + "\n")
    plot(results, str(RESULTS / f"inference_{args.tag}.png"))
    print(f"wrote {RESULTS}/inference_{args.tag}.{{json,md,png}} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
