"""`svdllm generate`: greedy chat generation from a model or compressed folder."""

from __future__ import annotations

import argparse

from svdllm_plugin.cli.contract import POSITIVE, debug_flag
from svdllm_plugin.models import DEFAULT_MODEL

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "generate", help="greedy chat generation from a model or compressed folder", parents=[debug_flag()]
    )
    g.add_argument("model", help=f"'{DEFAULT_MODEL}', a (compressed) folder, or a hub id")
    g.add_argument("--prompt", required=True, help="the user message (the chat template is applied)")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=64)
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


def run(args) -> str:
    from svdllm_plugin.generate import generate_reply

    return generate_reply(args.model, args.prompt, args.max_new_tokens, args.bnb, args.device, args.decode)
