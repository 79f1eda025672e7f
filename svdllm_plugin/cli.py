"""`svdllm` command line: compress a model with a recipe, evaluate, generate from or export a folder."""

from __future__ import annotations

import argparse
import json
import sys

from loguru import logger

from svdllm_plugin.models import DEFAULT_MODEL

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model with a recipe and save it")
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
    c.add_argument("--num-samples", type=int, default=64, help="calibration samples")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample / eval window")
    c.add_argument("--eval-windows", type=int, default=40, help="held-out windows for perplexity (0: skip)")
    c.add_argument("--output", required=True, help="folder to write (must not exist, see --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--device", default=None, help="device for evaluation (default: cuda if available)")
    c.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("eval", help="perplexity (and lm-eval tasks) of a model or compressed folder")
    e.add_argument("model", help=f"'{DEFAULT_MODEL}', a (compressed) folder, or a hub id")
    e.add_argument(
        "--dataset", default=None, help="'embedded' (default), a .txt/.jsonl file, or a hub dataset"
    )
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=40, help="number of non-overlapping windows")
    e.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval tasks (offline: svdllm_embedded); skips perplexity",
    )
    e.add_argument("--limit", type=int, default=None, help="lm-eval: documents per task")
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true", help="print a JSON object as the last line")

    g = sub.add_parser("generate", help="greedy chat generation from a model or compressed folder")
    g.add_argument("model", help=f"'{DEFAULT_MODEL}', a (compressed) folder, or a hub id")
    g.add_argument("--prompt", required=True, help="the user message (the chat template is applied)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument(
        "--bnb",
        choices=["nf4", "int8"],
        default=None,
        help="convert every Linear (the SVD factors included) to bitsandbytes NF4 / int8 first",
    )
    g.add_argument("--device", default=None)

    x = sub.add_parser("export-gptq", help="export a GPTQ-quantized folder in the auto-gptq layout")
    x.add_argument("model", help="a folder written by `svdllm compress` with a GPTQModifier recipe")
    x.add_argument("--output", required=True, help="folder to write (must not exist, see --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    from svdllm_plugin import bench

    bench.add_parser(sub)
    return parser


def _compress(args) -> None:
    from svdllm_plugin.compress import compress

    report = compress(
        model=args.model,
        output=args.output,
        recipe=args.recipe,
        dataset=args.dataset,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        eval_windows=args.eval_windows,
        overwrite=args.overwrite,
        device=args.device,
        seed=args.seed,
    )
    print(report.table())


def _eval(args) -> None:
    from svdllm_plugin.compress import default_device
    from svdllm_plugin.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    model.to(args.device or default_device())
    if args.tasks:
        from svdllm_plugin.lm_eval import format_results, run_lm_eval

        results = run_lm_eval(model, tokenizer, args.tasks.split(","), limit=args.limit)
        print(format_results(results))
        if args.json:
            print(json.dumps({"model": args.model, "results": results.get("results", {})}, default=str))
        return
    from svdllm_plugin.data import eval_windows, load_text
    from svdllm_plugin.evaluate import perplexity

    windows = eval_windows(tokenizer, load_text(args.dataset, "evaluation"), args.seq_len, args.max_windows)
    ppl = perplexity(model, windows)
    result = {
        "model": args.model,
        "perplexity": ppl,
        "windows": int(windows.shape[0]),
        "seq_len": args.seq_len,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {ppl:.4f} over {windows.shape[0]} windows of {args.seq_len} tokens")


def _generate(args) -> None:
    import torch

    from svdllm_plugin.compress import default_device
    from svdllm_plugin.models import load_model_and_tokenizer

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer; got {args.max_new_tokens}")
    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.bnb:
        from svdllm_plugin.quantized import to_bitsandbytes

        model = to_bitsandbytes(model, args.bnb)
    model.to(args.device or default_device())
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


def _export_gptq(args) -> None:
    from svdllm_plugin.atomic import check_output_dir
    from svdllm_plugin.export.gptq import export_gptq
    from svdllm_plugin.models import load_model_and_tokenizer

    check_output_dir(args.output, args.overwrite)
    model, tokenizer = load_model_and_tokenizer(args.model)
    folder = export_gptq(model, args.output, tokenizer, overwrite=args.overwrite)
    print(f"exported {args.model} as an auto-gptq checkpoint to {folder}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from svdllm_plugin import bench

        commands = {
            "bench": bench.run,
            "compress": _compress,
            "eval": _eval,
            "generate": _generate,
            "export-gptq": _export_gptq,
        }
        commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        logger.opt(exception=error).debug("svdllm failed")
        print(f"svdllm {args.command}: error: {_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdllm: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


def _message(error: Exception) -> str:
    """The innermost cause: pydantic and llmcompressor wrap the error that names the fix."""
    while error.__cause__ is not None and str(error.__cause__):
        error = error.__cause__
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
