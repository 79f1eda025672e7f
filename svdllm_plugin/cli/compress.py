"""`svdllm compress`: compress a model with a recipe and save it (``--target-bits`` / ``--target-size``:
search the stacks within that budget)."""

from __future__ import annotations

import argparse

from svdllm_plugin.cli.contract import POSITIVE, debug_flag, int_at_least
from svdllm_plugin.models import DEFAULT_MODEL

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("compress", help="compress a model with a recipe and save it", parents=[debug_flag()])
    c.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"'{DEFAULT_MODEL}' (embedded default), a local HF folder, or a hub id",
    )
    c.add_argument("--recipe", default=None, help="YAML recipe (default: SVDLLMModifier ratio 0.2)")
    c.add_argument(
        "--dataset",
        default=None,
        help="'embedded' (default), a .txt/.jsonl file, or a hub dataset (e.g. wikitext2)",
    )
    c.add_argument("--num-samples", type=POSITIVE, default=64, help="calibration samples")
    c.add_argument(
        "--seq-len", type=int_at_least(2), default=512, help="tokens per calibration sample / eval window"
    )
    c.add_argument(
        "--eval-windows",
        type=int_at_least(0, " (0: skip)"),
        default=40,
        help="held-out windows for perplexity (0: skip)",
    )
    c.add_argument("--output", required=True, help="folder to write (must not exist, see --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--device", default=None, help="device for evaluation (default: cuda if available)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--save-dtype",
        choices=["bf16", "fp16", "fp32"],
        default="bf16",
        help="dtype of the saved float tensors (embeddings, norms, float factors, scales); default bf16",
    )
    c.add_argument(
        "--eval-split",
        choices=["test", "validation"],
        default="test",
        help="which half of the held-out windows the perplexities are of (default: test)",
    )
    budget = c.add_mutually_exclusive_group()
    budget.add_argument(
        "--target-bits",
        default=None,
        help="search stacks for the best validation perplexity at <= B bits per decoder-Linear weight",
    )
    budget.add_argument(
        "--target-size", default=None, help="the same within a safetensors size (120MB, 0.1GB, 90MiB)"
    )
    return c


def _job(args) -> dict:
    """The options a compression and a budget search share."""
    return dict(
        model=args.model,
        output=args.output,
        dataset=args.dataset,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        eval_windows=args.eval_windows,
        overwrite=args.overwrite,
        device=args.device,
        seed=args.seed,
        save_dtype=args.save_dtype,
    )


def run(args) -> str:
    if args.target_bits is not None or args.target_size is not None:
        return _search(args)
    from svdllm_plugin.compress import compress

    return compress(**_job(args), recipe=args.recipe, eval_split=args.eval_split).table()


def _search(args) -> str:
    """`--target-bits / --target-size`: the table of what was tried, then the report."""
    from svdllm_plugin.candidates import parse_budget, table
    from svdllm_plugin.search import search

    budget = parse_budget(args.target_bits, args.target_size)
    if args.recipe is not None:
        raise ValueError("--recipe and a budget (--target-bits / --target-size) exclude each other; drop one")
    if args.eval_split != "test":
        raise ValueError(
            "a budget search chooses on the validation split and reports the test split; drop --eval-split"
        )
    report, trials = search(**_job(args), budget=budget)
    return f"Budget: {budget} (chosen on the validation split)\n\n{table(trials)}\n\n{report.table()}"
