"""`svdllm bench`: inference speed and memory of a (compressed) model against a baseline.

Measured, per model: prefill tokens/s for batch x length shapes (the batch-1 latency is the
time to first token), decode tokens/s at several context lengths, KV-cache bytes per token,
weight bytes and the peak memory a prefill adds. Models are measured ALTERNATELY inside one
process (every repetition runs each model once, in turn), so machine noise hits all of them;
the figures are medians over the repetitions after warm-up. Beside each measured ratio stand
the ratios the arithmetic predicts: multiply-accumulates (FLOP ratio) and bytes read per
token (weights, plus the KV cache when decoding), which bound compute- and memory-bound runs.

The command imports nothing heavy at import time; the work is in ``svdllm_plugin.bench``.
"""

from __future__ import annotations

import argparse
import json
import sys

from svdllm_plugin.bench.measure import _ints, _shapes, benchmark, load_variant
from svdllm_plugin.bench.report import check_plot_path, format_table, plot

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    b = subparsers.add_parser(
        "bench",
        help="prefill/decode speed, KV-cache and weight memory of a model against a baseline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("model", nargs="?", help="'smollm2-135m', a dense HF folder or a compressed folder")
    b.add_argument("--baseline", default=None, help="model to compare with (e.g. smollm2-135m)")
    b.add_argument(
        "--fuse",
        choices=["auto", "on", "off"],
        default="off",
        help="one GEMM for the factors of q/k/v and gate/up (auto: on for factorized models; "
        "off by default: it measured within noise of unfused)",
    )
    b.add_argument(
        "--latent-cache", action="store_true", help="cache svd_v(x) of factorized k/v instead of K and V"
    )
    b.add_argument("--prefill", default="1x128,1x512", help="batch x length shapes (default: 1x128,1x512)")
    b.add_argument("--contexts", default="128,1024", help="decode context lengths (up to max positions)")
    b.add_argument("--decode-tokens", type=int, default=8, help="tokens decoded per timed decode run")
    b.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    b.add_argument("--plot", default=None, help="write a PNG plot to this file")
    from svdllm_plugin.bench.decode import add_arguments  # --synthetic and its options

    add_arguments(b)
    return b


def run(args) -> str:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (args.model is None) == (args.synthetic is None):
        raise ValueError(
            "bench takes a MODEL or --synthetic NAME_OR_CONFIG (random weights), not both nor neither"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.synthetic:
        from svdllm_plugin.bench.decode import run_synthetic

        return run_synthetic(args, device)
    shapes, contexts = _shapes(args.prefill), _ints(args.contexts, "--contexts")
    if args.decode_tokens < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--decode-tokens and --repeats must be >= 1 and --warmup >= 0")
    if args.plot:  # checked now, not after minutes of measurements
        args.plot = check_plot_path(args.plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = []
    if args.baseline:
        variants.append(load_variant(args.baseline, f"{args.baseline} (baseline)", fuse="off", device=device))
    variants.append(load_variant(args.model, args.model, args.fuse, args.latent_cache, device))
    limit = min(getattr(v.model.config.get_text_config(), "max_position_embeddings", 10**9) for v in variants)
    too_long = [n for n in contexts + [length for _, length in shapes] if n + args.decode_tokens > limit]
    if too_long:
        raise ValueError(f"lengths {too_long} (+ --decode-tokens) exceed max_position_embeddings={limit}")
    results = benchmark(variants, shapes, contexts, args.decode_tokens, args.repeats, args.warmup, device)
    if args.plot:
        try:
            plot(results, args.plot)
        except Exception as error:  # keep the measurements: they go to the log before the error
            print(format_table(results), file=sys.stderr)
            raise RuntimeError(
                f"--plot {args.plot} could not be written ({error}); the measurements are printed above"
            ) from error
        print(f"plot written to {args.plot}", file=sys.stderr)
    # the CLI prints what run returns on stdout (logs go to stderr): the JSON alone with --json
    return json.dumps(results) if args.json else format_table(results)
