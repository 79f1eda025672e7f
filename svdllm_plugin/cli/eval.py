"""`svdllm eval`: perplexity (and lm-eval tasks) of a model or compressed folder."""

from __future__ import annotations

import argparse
import json

from svdllm_plugin.cli.contract import POSITIVE, debug_flag, int_at_least
from svdllm_plugin.models import DEFAULT_MODEL

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser(
        "eval", help="perplexity (and lm-eval tasks) of a model or compressed folder", parents=[debug_flag()]
    )
    e.add_argument("model", help=f"'{DEFAULT_MODEL}', a (compressed) folder, or a hub id")
    e.add_argument(
        "--dataset", default=None, help="'embedded' (default), a .txt/.jsonl file, or a hub dataset"
    )
    e.add_argument("--seq-len", type=int_at_least(2), default=512)
    e.add_argument("--max-windows", type=POSITIVE, default=40, help="number of non-overlapping windows")
    e.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval tasks (offline: svdllm_embedded); skips perplexity",
    )
    e.add_argument("--limit", type=POSITIVE, default=None, help="lm-eval: documents per task")
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true", help="print one JSON object (and nothing else) on stdout")
    return e


def run(args) -> str:
    from svdllm_plugin.compress import check_device
    from svdllm_plugin.models import load_model_and_tokenizer

    device = check_device(args.device)

    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise ValueError(f"--tasks {args.tasks!r} names no task; give comma-separated lm-eval task names")
        model, tokenizer = load_model_and_tokenizer(args.model)
        model.to(device)
        from svdllm_plugin.lm_eval import format_results, run_lm_eval

        results = run_lm_eval(model, tokenizer, tasks, limit=args.limit)
        if args.json:
            return json.dumps({"model": args.model, "results": results.get("results", {})}, default=str)
        return format_results(results)
    from svdllm_plugin.evaluate import evaluate_perplexity

    result = evaluate_perplexity(args.model, args.dataset, args.seq_len, args.max_windows, device)
    if args.json:
        return json.dumps(result)
    return f"perplexity {result['perplexity']:.4f} over {result['windows']} windows of {args.seq_len} tokens"
