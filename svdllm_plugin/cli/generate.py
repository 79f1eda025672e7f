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
