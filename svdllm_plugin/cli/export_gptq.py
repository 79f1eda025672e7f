"""`svdllm export-gptq`: export a GPTQ-quantized folder in the auto-gptq layout."""

from __future__ import annotations

import argparse

from svdllm_plugin.cli.contract import debug_flag

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    x = sub.add_parser(
        "export-gptq", help="export a GPTQ-quantized folder in the auto-gptq layout", parents=[debug_flag()]
    )
    x.add_argument("model", help="a folder written by `svdllm compress` with a GPTQModifier recipe")
    x.add_argument("--output", required=True, help="folder to write (must not exist, see --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return x


def run(args) -> str:
    from svdllm_plugin.atomic import check_output_dir
    from svdllm_plugin.export.gptq import export_gptq
    from svdllm_plugin.models import load_model_and_tokenizer

    check_output_dir(args.output, args.overwrite, inputs=[("model", args.model)])
    model, tokenizer = load_model_and_tokenizer(args.model)
    folder = export_gptq(model, args.output, tokenizer, overwrite=args.overwrite)
    return f"exported {args.model} as an auto-gptq checkpoint to {folder}"
