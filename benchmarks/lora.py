"""Sequential LoRA on the factors of an SVD-compressed model: u then v, v then u, and
simultaneous (the paper's comparison), each against no fine-tuning.

    .venv/bin/python benchmarks/lora.py [--ratio 0.4] [--steps 25] [--lr 1e-3]

Compresses once (SVD-LLM, original activations), saves, then reloads that checkpoint for
each variant and fine-tunes through llmcompressor's oneshot with SequentialLoRAModifier.
Held-out perplexity is on the embedded evaluation split (not the LoRA training text) and on
another domain (license prose, ``ppl_other``). Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import markdown, run_recipe, save, setup

from svdllm_plugin import SequentialLoRAModifier, SVDLLMModifier
from svdllm_plugin.checkpoint import load_pretrained, save_pretrained
from svdllm_plugin.compress import single_pass
from svdllm_plugin.layers import factorized_ranks

VARIANTS = {"u_then_v": ["u", "v"], "v_then_u": ["v", "u"], "simultaneous": ["uv"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=15, help="optimizer steps per round")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--name", default="lora")
    parser.add_argument(
        "--svd",
        choices=["plain", "best"],
        default="plain",
        help="plain SVD-LLM, or the best whitening-only configuration (Fisher rows + update + intra_layer)",
    )
    args = parser.parse_args()

    bench = setup(args.model, args.num_samples, 256, args.eval_windows)
    best = dict(row_weighting="fisher", fisher_batches=args.num_samples, update="input", intra_layer=True)
    svd = SVDLLMModifier(ratio=args.ratio, **(best if args.svd == "best" else {}))
    model, seconds = run_recipe(bench, svd, propagate_error=not single_pass([svd]))
    columns = ["variant", "ppl", "ppl_other", "seconds"]
    dense = dict(
        variant="dense", ppl=bench.ppl(bench.model), ppl_other=bench.ppl_other(bench.model), seconds=0.0
    )
    rows = [
        dense,
        dict(
            variant=f"none ({args.svd} SVD-LLM only)",
            ppl=bench.ppl(model),
            ppl_other=bench.ppl_other(model),
            seconds=seconds,
        ),
    ]
    print(markdown(rows, columns), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = f"{tmp}/svd"
        save_pretrained(model, folder, bench.tokenizer)
        ranks = factorized_ranks(model)
        del model
        for variant in args.variants:
            model = load_pretrained(folder)
            lora = SequentialLoRAModifier(
                order=VARIANTS[variant],
                steps=args.steps,
                lr=args.lr,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                num_samples=args.steps * args.batch_size,
                eval_windows=0,
            )
            start = time.perf_counter()
            run_lora(model, lora)
            assert factorized_ranks(model) == ranks, "LoRA changed a rank"
            rows.append(
                dict(
                    variant=variant,
                    ppl=bench.ppl(model),
                    ppl_other=bench.ppl_other(model),
                    seconds=time.perf_counter() - start,
                    rounds=[
                        (r["factor"], round(r["first_loss"], 3), round(r["last_loss"], 3))
                        for r in lora.records
                    ],
                )
            )
            print(markdown(rows[-1:], columns), flush=True)
            save(args.name, dict(args=vars(args), rows=rows))
    table = markdown(rows, columns)
    print(table)
    save(args.name, dict(args=vars(args), rows=rows)).with_suffix(".md").write_text(table + "\n")


def run_lora(model, modifier) -> None:
    from llmcompressor import oneshot

    oneshot(model=model, recipe=modifier)


if __name__ == "__main__":
    main()
