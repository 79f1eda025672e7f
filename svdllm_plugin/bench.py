"""`svdllm bench`: inference speed and memory of a (compressed) model against a baseline.

Measured, per model: prefill tokens/s for batch x length shapes (the batch-1 latency is the
time to first token), decode tokens/s at several context lengths, KV-cache bytes per token,
weight bytes and the peak memory a prefill adds. Models are measured ALTERNATELY inside one
process (every repetition runs each model once, in turn), so machine noise hits all of them;
the figures are medians over the repetitions after warm-up. Beside each measured ratio stand
the ratios the arithmetic predicts: multiply-accumulates (FLOP ratio) and bytes read per
token (weights, plus the KV cache when decoding), which bound compute- and memory-bound runs.

This module imports nothing heavy at import time (the CLI lists it for free).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

__all__ = ["add_parser", "run", "Variant", "load_variant", "benchmark", "format_table", "plot"]


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
    from svdllm_plugin.bench_decode import add_arguments  # --synthetic and its options

    add_arguments(b)
    return b


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(
            f"--prefill takes BATCHxLENGTH shapes separated by commas, e.g. 1x128,4x512; got {text!r}"
        )
    return shapes


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} takes positive integers separated by commas; got {text!r}")
    return values


@dataclass
class Variant:
    """A model under test; ``make_cache()`` gives a fresh KV cache (None: transformers' DynamicCache)."""

    name: str
    model: object
    make_cache: object = None
    notes: list[str] = field(default_factory=list)

    def cache(self):
        if self.make_cache is not None:
            return self.make_cache()
        from transformers import DynamicCache

        return DynamicCache()


def load_variant(
    path: str, name: str | None = None, fuse: str = "off", latent_cache: bool = False, device="cpu"
):
    """Load ``path`` with ``load_model_and_tokenizer`` and apply the runtime options."""
    from svdllm_plugin.inference import prepare_for_inference
    from svdllm_plugin.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(path)
    model = model.to(device).eval()
    prepare_for_inference(model, {"auto": None, "on": True, "off": False}[fuse], latent_cache)
    notes = []
    if getattr(model, "_svdllm_fused_groups", 0):
        notes.append(f"fused {model._svdllm_fused_groups} groups")
    make_cache = getattr(model, "_svdllm_latent_cache", None)
    if make_cache is not None:
        notes.append("latent KV cache")
    return Variant(name or path, model, make_cache, notes)


# ---- timing ---------------------------------------------------------------------------------


def _timer(device: str):
    """A function ``time(fn) -> seconds``: CUDA events on a GPU, perf_counter on the CPU."""
    import torch

    if device.startswith("cuda"):

        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0

        return timed

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def _alternate(variants, fns, timed, repeats: int, warmup: int) -> list[dict]:
    """Run ``fns[i]`` of each variant in turn, ``warmup + repeats`` rounds; median and spread."""
    times = [[] for _ in variants]
    for round_ in range(warmup + repeats):
        for i, fn in enumerate(fns):
            t = timed(fn)
            if round_ >= warmup:
                times[i].append(t)
    return [
        {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "runs": len(ts)}
        for ts in times
    ]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_extra_bytes(fn, device: str) -> int:
    """Memory a call adds at its peak: CUDA allocator statistics, or sampled RSS on the CPU."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        before = _rss()
    except OSError:  # no /proc: not Linux
        return -1
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss()) - before


# ---- arithmetic -------------------------------------------------------------------------------


def weight_bytes(model) -> int:
    """Bytes of the parameters (a tied embedding / lm_head counted once)."""
    seen = {}
    for p in model.parameters():
        seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


def _attention_shape(model) -> tuple[int, int, int]:
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, head_dim


def linear_macs_per_token(model, head: bool = True) -> int:
    """Multiply-accumulates of every Linear / fused GEMM for one token (lm_head only with ``head``)."""
    from torch import nn

    from svdllm_plugin.inference.fused import SharedInputGemm

    lm_head = model.get_output_embeddings()
    return sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, (nn.Linear, SharedInputGemm)) and (head or m is not lm_head)
    )


def _latent_macs_per_position(variant, decoding: bool) -> int:
    """Latent cache: extra MACs per cached position and token, summed over layers.

    K is rebuilt (svd_u_k) at every position. V is rebuilt too, except when decoding with
    folded values, where attention reads the r_v-wide latent instead of head_dim-wide V.
    """
    if variant.make_cache is None:
        return 0
    from svdllm_plugin.inference.latent_cache import _attention_modules

    fold = decoding and getattr(variant.make_cache, "keywords", {}).get("fold_values", True)
    total = 0
    for attn in _attention_modules(variant.model):
        if hasattr(attn.k_proj, "svd_u"):
            total += attn.k_proj.svd_u.weight.numel()
        if hasattr(attn.v_proj, "svd_u"):
            if fold:  # AV over r_v instead of head_dim columns per head
                heads = attn.o_proj.in_features // attn.head_dim
                total += heads * (attn.v_proj.svd_u.in_features - attn.head_dim)
            else:
                total += attn.v_proj.svd_u.weight.numel()
    return total


def prefill_macs(variant, batch: int, length: int) -> float:
    """Prefill from an empty cache (the latent cache then rebuilds nothing)."""
    layers, heads, head_dim = _attention_shape(variant.model)
    # logits only for the last position (logits_to_keep=1), as a server prefills
    head = variant.model.get_output_embeddings().weight.numel()
    linear = linear_macs_per_token(variant.model, head=False) * length + head
    attention = layers * heads * head_dim * length * (length + 1)  # QK^T and AV, causal
    return batch * (linear + attention)


def decode_macs(variant, context: int) -> float:
    layers, heads, head_dim = _attention_shape(variant.model)
    attention = layers * 2 * heads * head_dim * context
    return (
        linear_macs_per_token(variant.model) + attention + _latent_macs_per_position(variant, True) * context
    )


# ---- measurements -----------------------------------------------------------------------------


def benchmark(
    variants: list[Variant],
    prefill=((1, 128), (1, 512)),
    contexts=(128, 1024),
    decode_tokens: int = 8,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    seed: int = 0,
    log=None,
) -> dict:
    """Measure every variant, alternating; ``variants[0]`` is the baseline of the ratios."""
    import torch

    with torch.inference_mode():
        return _benchmark(variants, prefill, contexts, decode_tokens, repeats, warmup, device, seed, log)


def _benchmark(variants, prefill, contexts, decode_tokens, repeats, warmup, device, seed, log) -> dict:
    import torch

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    timed = _timer(device)
    vocab = min(v.model.config.get_text_config().vocab_size for v in variants)
    generator = torch.Generator().manual_seed(seed)
    results = {
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "models": [
            {"name": v.name, "notes": v.notes, "weight_bytes": weight_bytes(v.model)} for v in variants
        ],
        "prefill": [],
        "decode": [],
    }
    for batch, length in prefill:
        ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)

        def prefill_fn(v, ids=ids):
            return lambda: v.model(ids, past_key_values=v.cache(), use_cache=True, logits_to_keep=1)

        log(f"prefill {batch}x{length} ...")
        stats = _alternate(variants, [prefill_fn(v) for v in variants], timed, repeats, warmup)
        results["prefill"].append(
            {
                "batch": batch,
                "length": length,
                "per_model": [
                    {
                        **s,
                        "tokens_per_s": batch * length / s["median_s"],
                        "macs": prefill_macs(v, batch, length),
                    }
                    for v, s in zip(variants, stats)
                ],
            }
        )
    for context in contexts:
        ids = torch.randint(0, vocab, (1, context), generator=generator).to(device)
        caches, first, peaks = [], [], []
        log(f"decode at context {context}: prefill ...")
        for v in variants:
            cache, out = v.cache(), {}

            def fill(v=v, cache=cache, out=out, ids=ids):
                out["logits"] = v.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

            peaks.append(_peak_extra_bytes(fill, device))  # the KV cache it builds included
            caches.append(cache)
            first.append(out["logits"][:, -1].argmax(-1, keepdim=True))
        kv = [_cache_nbytes(c) / context for c in caches]

        def decode_fn(v, cache, token):
            def steps():
                nxt = token
                for _ in range(decode_tokens):
                    out = v.model(nxt, past_key_values=cache, use_cache=True)
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                cache.crop(-decode_tokens)  # back to `context` for the next run (crop is cheap)

            return steps

        log(f"decode at context {context}: {decode_tokens} tokens x {warmup + repeats} rounds ...")
        stats = _alternate(
            variants, [decode_fn(v, c, t) for v, c, t in zip(variants, caches, first)], timed, repeats, warmup
        )
        results["decode"].append(
            {
                "context": context,
                "per_model": [
                    {
                        **s,
                        "tokens_per_s": decode_tokens / s["median_s"],
                        "kv_bytes_per_token": b,
                        "macs_per_token": decode_macs(v, context),
                        "bytes_per_token": weight_bytes(v.model) + b * context,
                        "prefill_peak_extra_bytes": peak,
                    }
                    for v, s, b, peak in zip(variants, stats, kv, peaks)
                ],
            }
        )
        del caches
    return results


def _cache_nbytes(cache) -> int:
    from svdllm_plugin.inference import cache_nbytes

    return cache_nbytes(cache)


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, torch threads: {torch.get_num_threads()}"


# ---- output -----------------------------------------------------------------------------------


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def format_table(results: dict) -> str:
    """Markdown tables: measured values per model, then ratios against the first model.

    Speed ratios are baseline time / model time (above 1: the model is faster); the FLOP and
    byte ratios are model / baseline (below 1: the model does or reads less).
    """
    names = [m["name"] for m in results["models"]]
    base = results["models"][0]
    lines = [
        f"device: {results['device']}; median of {results['repeats']} runs after {results['warmup']} warm-up"
    ]
    lines.append("")
    lines.append("| model | weights MiB | x baseline | notes |")
    lines.append("|---|---:|---:|---|")
    for m in results["models"]:
        lines.append(
            f"| {m['name']} | {m['weight_bytes'] / 2**20:.1f} | "
            f"{_ratio(m['weight_bytes'], base['weight_bytes'])} | {', '.join(m['notes']) or '-'} |"
        )
    lines.append("")
    head = "| measurement | " + " | ".join(names) + " |"
    lines.append(head)
    lines.append("|---|" + "---:|" * len(names))
    for row in results["prefill"]:
        label = f"prefill {row['batch']}x{row['length']} tok/s"
        lines.append(
            f"| {label} | " + " | ".join(f"{p['tokens_per_s']:.0f}" for p in row["per_model"]) + " |"
        )
        if row["batch"] == 1:
            lines.append(
                f"| time to first token, {row['length']}-token prompt (ms) | "
                + " | ".join(f"{1000 * p['median_s']:.0f}" for p in row["per_model"])
                + " |"
            )
    for row in results["decode"]:
        lines.append(
            f"| decode @{row['context']} tok/s | "
            + " | ".join(f"{p['tokens_per_s']:.1f}" for p in row["per_model"])
            + " |"
        )
    for row in results["decode"]:
        lines.append(
            f"| prefill of {row['context']} tokens: peak extra MiB (KV cache incl.) | "
            + " | ".join(f"{p['prefill_peak_extra_bytes'] / 2**20:.1f}" for p in row["per_model"])
            + " |"
        )
    if results["decode"]:
        lines.append(
            "| KV cache bytes/token | "
            + " | ".join(f"{p['kv_bytes_per_token']:.0f}" for p in results["decode"][0]["per_model"])
            + " |"
        )
    if len(names) > 1:
        lines.append("")
        lines.append(
            "| vs " + names[0] + " | model | speedup (measured) | FLOP ratio | byte ratio | spread |"
        )
        lines.append("|---|---|---:|---:|---:|---|")
        for row in results["prefill"]:
            b = row["per_model"][0]
            for name, p in zip(names[1:], row["per_model"][1:]):
                shape = f"{row['batch']}x{row['length']}"
                lines.append(
                    f"| prefill {shape} | {name} | {_ratio(b['median_s'], p['median_s'])} | "
                    f"{_ratio(p['macs'], b['macs'])} | "
                    f"{_ratio(_model_bytes(results, name), base['weight_bytes'])} | {_spread(p)} |"
                )
        for row in results["decode"]:
            b = row["per_model"][0]
            for name, p in zip(names[1:], row["per_model"][1:]):
                lines.append(
                    f"| decode @{row['context']} | {name} | {_ratio(b['median_s'], p['median_s'])} | "
                    f"{_ratio(p['macs_per_token'], b['macs_per_token'])} | "
                    f"{_ratio(p['bytes_per_token'], b['bytes_per_token'])} | {_spread(p)} |"
                )
        if results["decode"]:
            row = results["decode"][0]["per_model"]
            for name, p in zip(names[1:], row[1:]):
                lines.append(
                    f"| KV cache bytes/token | {name} | - | - | "
                    f"{_ratio(p['kv_bytes_per_token'], row[0]['kv_bytes_per_token'])} | - |"
                )
    return "\n".join(lines)


def _model_bytes(results, name) -> int:
    return next(m["weight_bytes"] for m in results["models"] if m["name"] == name)


def _spread(p) -> str:
    """(max - min) / median of the timed runs: how noisy the measurement was."""
    return f"{(p['max_s'] - p['min_s']) / p['median_s']:.0%}"


def plot(results: dict, path: str) -> None:
    """Prefill tokens/s per shape, decode tokens/s per context, KV bytes/token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m["name"] for m in results["models"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(names)
    shapes = [f"{r['batch']}x{r['length']}" for r in results["prefill"]]
    for i, name in enumerate(names):
        axes[0].bar(
            [x + i * width for x in range(len(shapes))],
            [r["per_model"][i]["tokens_per_s"] for r in results["prefill"]],
            width,
            label=name,
        )
        axes[1].plot(
            [r["context"] for r in results["decode"]],
            [r["per_model"][i]["tokens_per_s"] for r in results["decode"]],
            marker="o",
            label=name,
        )
    axes[0].set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(shapes))], shapes)
    axes[0].set(title="prefill", xlabel="batch x length", ylabel="tokens/s")
    axes[1].set(title="decode (batch 1)", xlabel="context length", ylabel="tokens/s")
    if results["decode"]:
        axes[1].set_xscale("log", base=2)
        kv = [p["kv_bytes_per_token"] / 1024 for p in results["decode"][0]["per_model"]]
        axes[2].bar(range(len(names)), kv, color=[f"C{i}" for i in range(len(names))])
        axes[2].set_xticks(range(len(names)), names, rotation=15, ha="right")
    axes[2].set(title="KV cache per token", ylabel="KiB")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['device']}; medians of {results['repeats']} alternating runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_plot_path(path: str) -> str:
    """The file ``plot`` will write (``.png`` added to a bare name, as matplotlib does), refused now
    when it is a folder, cannot be created, or has a type matplotlib cannot write."""
    from svdllm_plugin.atomic import check_output_file

    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install 'svdllm-plugin[bench]'") from error
    file = check_output_file(path, "--plot", suffix=".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if file.suffix[1:].lower() not in formats:
        raise ValueError(
            f"--plot {path}: matplotlib cannot write {file.suffix!r} files; "
            "end the name in .png, .pdf or .svg"
        )
    return str(file)


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
        from svdllm_plugin.bench_decode import run_synthetic

        return run_synthetic(args, device)
    shapes, contexts = _shapes(args.prefill), _ints(args.contexts, "--contexts")
    if args.decode_tokens < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--decode-tokens and --repeats must be >= 1 and --warmup >= 0")
    if args.plot:  # checked now, not after minutes of measurements
        args.plot = _check_plot_path(args.plot)
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
