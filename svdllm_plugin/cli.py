"""`svdllm` command line: compress a model with a recipe, evaluate, generate from or export a folder.

Importing this module is cheap (no torch, no llmcompressor): help and argument errors answer at
once, and each command imports what it needs when it runs. Every failure ends in one line on
stderr (``svdllm CMD: error: ...``) and a non-zero exit; ``--debug`` or ``SVDLLM_DEBUG=1`` adds
the traceback. stdout carries only results (the table, the JSON); logs go to stderr.

A command is a pair (``add_parser(subparsers)``, ``run(args) -> str | None``): ``run`` returns
the text for stdout, anything it prints itself goes to stderr. A module that defines the two
functions joins the command line by being named in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from svdllm_plugin.models import DEFAULT_MODEL

__all__ = ["main", "build_parser", "error_message", "COMMAND_MODULES"]

# modules with add_parser(subparsers) and run(args), e.g. "svdllm_plugin.bench"; keep them light to import
COMMAND_MODULES: tuple[str, ...] = ("svdllm_plugin.bench",)

_PACKAGE_DIR = Path(__file__).resolve().parent


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (with where to look), not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _int_at_least(minimum: int, note: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{note}; got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


_POSITIVE = _int_at_least(1)


def _debug_flag() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of a failure (or set SVDLLM_DEBUG=1)",
    )
    return common


# ---------------------------------------------------------------- compress


def _compress_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("compress", help="compress a model with a recipe and save it", parents=[_debug_flag()])
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
    c.add_argument("--num-samples", type=_POSITIVE, default=64, help="calibration samples")
    c.add_argument(
        "--seq-len", type=_int_at_least(2), default=512, help="tokens per calibration sample / eval window"
    )
    c.add_argument(
        "--eval-windows",
        type=_int_at_least(0, " (0: skip)"),
        default=40,
        help="held-out windows for perplexity (0: skip)",
    )
    c.add_argument("--output", required=True, help="folder to write (must not exist, see --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--device", default=None, help="device for evaluation (default: cuda if available)")
    c.add_argument("--seed", type=int, default=0)
    return c


def _compress(args) -> str:
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
    return report.table()


# ---------------------------------------------------------------- eval


def _eval_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser(
        "eval", help="perplexity (and lm-eval tasks) of a model or compressed folder", parents=[_debug_flag()]
    )
    e.add_argument("model", help=f"'{DEFAULT_MODEL}', a (compressed) folder, or a hub id")
    e.add_argument(
        "--dataset", default=None, help="'embedded' (default), a .txt/.jsonl file, or a hub dataset"
    )
    e.add_argument("--seq-len", type=_int_at_least(2), default=512)
    e.add_argument("--max-windows", type=_POSITIVE, default=40, help="number of non-overlapping windows")
    e.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval tasks (offline: svdllm_embedded); skips perplexity",
    )
    e.add_argument("--limit", type=_POSITIVE, default=None, help="lm-eval: documents per task")
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true", help="print one JSON object (and nothing else) on stdout")
    return e


def _eval(args) -> str:
    from svdllm_plugin.compress import check_device
    from svdllm_plugin.models import check_model, check_seq_len, load_model_and_tokenizer

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
    from svdllm_plugin.data import eval_windows, load_text
    from svdllm_plugin.evaluate import perplexity

    path = check_model(args.model)
    text = load_text(args.dataset, "evaluation")  # read before the weights load
    check_seq_len(path, args.seq_len)
    model, tokenizer = load_model_and_tokenizer(path, check=False)
    model.to(device)
    windows = eval_windows(tokenizer, text, args.seq_len, args.max_windows)
    ppl = perplexity(model, windows)
    result = {
        "model": args.model,
        "perplexity": ppl,
        "windows": int(windows.shape[0]),
        "seq_len": args.seq_len,
    }
    if args.json:
        return json.dumps(result)
    return f"perplexity {ppl:.4f} over {windows.shape[0]} windows of {args.seq_len} tokens"


# ---------------------------------------------------------------- generate


def _generate_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "generate", help="greedy chat generation from a model or compressed folder", parents=[_debug_flag()]
    )
    g.add_argument("model", help=f"'{DEFAULT_MODEL}', a (compressed) folder, or a hub id")
    g.add_argument("--prompt", required=True, help="the user message (the chat template is applied)")
    g.add_argument("--max-new-tokens", type=_POSITIVE, default=64)
    g.add_argument(
        "--bnb",
        choices=["nf4", "int8"],
        default=None,
        help="convert every Linear (the SVD factors included) to bitsandbytes NF4 / int8 first",
    )
    g.add_argument("--device", default=None)
    g.add_argument(
        "--decode",
        choices=["auto", "eager", "graph"],
        default="auto",
        help="graph: static KV cache + compiled decode step (CUDA graphs on a GPU; on a CPU the "
        "compilation takes about a minute); auto: graph on CUDA, eager elsewhere",
    )
    return g


def _generate(args) -> str:
    import torch

    from svdllm_plugin.compress import check_device
    from svdllm_plugin.models import load_model_and_tokenizer

    device = check_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.bnb:
        from svdllm_plugin.export.bitsandbytes import to_bitsandbytes

        model = to_bitsandbytes(model, args.bnb)
    model.to(device)
    latent = getattr(model, "_svdllm_latent_cache", None) is not None  # a folder's load-time option
    if args.decode == "graph" or (
        args.decode == "auto" and str(device).startswith("cuda") and not (args.bnb or latent)
    ):
        from svdllm_plugin.inference.graph import enable_graph_decode

        enable_graph_decode(model, device=device)
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
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- export-gptq


def _export_gptq_parser(sub) -> argparse.ArgumentParser:
    x = sub.add_parser(
        "export-gptq", help="export a GPTQ-quantized folder in the auto-gptq layout", parents=[_debug_flag()]
    )
    x.add_argument("model", help="a folder written by `svdllm compress` with a GPTQModifier recipe")
    x.add_argument("--output", required=True, help="folder to write (must not exist, see --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return x


def _export_gptq(args) -> str:
    from svdllm_plugin.atomic import check_output_dir
    from svdllm_plugin.export.gptq import export_gptq
    from svdllm_plugin.models import load_model_and_tokenizer

    check_output_dir(args.output, args.overwrite, inputs=[("model", args.model)])
    model, tokenizer = load_model_and_tokenizer(args.model)
    folder = export_gptq(model, args.output, tokenizer, overwrite=args.overwrite)
    return f"exported {args.model} as an auto-gptq checkpoint to {folder}"


# ---------------------------------------------------------------- the command line

_COMMANDS = (
    (_compress_parser, _compress),
    (_eval_parser, _eval),
    (_generate_parser, _generate),
    (_export_gptq_parser, _export_gptq),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svdllm", description=__doc__.split("\n\n")[0], parents=[_debug_flag()])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = [*_COMMANDS]
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        commands.append((module.add_parser, module.run))
    for add_parser, run in commands:
        add_parser(sub).set_defaults(run=run)
    return parser


def _debug_wanted(args) -> bool:
    return getattr(args, "debug", False) or os.environ.get("SVDLLM_DEBUG", "").lower() not in (
        "",
        "0",
        "false",
    )


def _logs_to_stderr(debug: bool) -> None:
    """loguru to stderr only; llmcompressor points it at stdout when it loads, so redo it then."""
    from loguru import logger

    from svdllm_plugin._imports import when_imported

    level = "DEBUG" if debug else "INFO"
    fmt = "{time:YYYY-MM-DDTHH:mm:ss} | {level} | {message}"

    def configure():
        llmcompressor_logger = sys.modules.get("llmcompressor.logger")
        logger.remove()
        logger.add(
            sys.stderr,
            level=level,
            format=fmt,
            filter=getattr(llmcompressor_logger, "support_log_once", None),
        )

    configure()
    when_imported("llmcompressor.logger", configure)
    # bitsandbytes warns at import that an optional CPU kernel package is missing: noise for a user
    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET if debug else logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = _debug_wanted(args)
    stdout = sys.stdout
    try:
        _logs_to_stderr(debug)
        with contextlib.redirect_stdout(sys.stderr):  # whatever a library prints is not a result
            result = args.run(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"svdllm {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  (every failure becomes one line)
        if debug:
            traceback.print_exc()
        print(f"svdllm {args.command}: error: {error_message(error)}", file=sys.stderr)
        return 2
    if result is not None:
        print(result, file=stdout)
    return 0


# ---------------------------------------------------------------- one-line messages


def _raised_by_us(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    file = Path(tb.tb_frame.f_code.co_filename).resolve()
    return _PACKAGE_DIR in file.parents and file.name != "cli.py"


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _validation_message(error) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e.get("loc", ()))
        msg = e.get("msg", "").removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return f"{error.title}: " + "; ".join(parts)


def error_message(error: BaseException) -> str:
    """One line saying what is wrong and what to do.

    The plugin's own errors name the file or option and the fix: the outermost of them in the
    ``raise ... from`` chain is kept (it has the context: file name, line). Errors that come
    only from libraries (llmcompressor wraps the error of a modifier) give their innermost
    cause, and unexpected ones say how to see the traceback.
    """
    chain = [error]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:
        chain.append(chain[-1].__cause__)
    ours = next((e for e in chain if _raised_by_us(e) and str(e)), None)
    if ours is not None:
        return _one_line(str(ours))
    inner = next((e for e in reversed(chain) if str(e)), error)
    if type(inner).__name__ == "ValidationError" and hasattr(inner, "errors"):
        return _one_line(_validation_message(inner))
    if type(inner).__module__.startswith("safetensors") or "SafetensorError" in type(inner).__name__:
        return (
            f"a safetensors file cannot be read ({_one_line(str(inner))}); the checkpoint is truncated or "
            "corrupted: re-save or re-download it"
        )
    if isinstance(inner, (ValueError, OSError, RuntimeError)):
        return _one_line(str(inner))
    return (
        f"{type(inner).__name__}: {_one_line(str(inner))} (unexpected; rerun with --debug for the traceback)"
    )


if __name__ == "__main__":
    sys.exit(main())
