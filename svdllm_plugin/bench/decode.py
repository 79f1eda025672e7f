"""`svdllm bench --synthetic`: dense against factorized at several ratios, per decode regime.

Regimes (``--decode``), each timed with the dense model in the same regime, alternating
models round by round in one process (medians):

- ``eager``: transformers' forward, DynamicCache (what ``generate`` does by default);
- ``graph``: static KV cache + the one-token step compiled (CUDA graphs on a GPU), see
  ``inference/graph.py``; the dense model decodes the same way;
- ``graph-fused``: ``graph`` after fusing the shared-input q/k/v and gate/up GEMMs (the dense
  model's too);
- ``graph-kernel``: ``graph`` with the one-launch low-rank Triton kernel (CUDA only; skipped
  elsewhere);
- ``latent``: eager decode with the latent KV cache (cache svd_v(x) of k/v; dense: eager).

Each row: ``ratio`` (0 for the dense model), ``regime``, ``batch``, ``context``,
``ms_per_token``, ``time_vs_dense`` (same regime), ``time_vs_dense_best`` (against the dense
model's fastest regime at that batch and context), ``param_ratio`` (decoder-layer parameters
against dense), ``read_ratio`` (decode rows: weight bytes one step reads, LM head included,
against dense: the limit of a memory-bound decode on any hardware), on CUDA ``floor_ms`` (weights + KV cache
bytes read per step / measured copy bandwidth), and for every regime but ``eager``
``same_tokens`` (its greedy tokens equal the eager ones of the same model). Prefill rows
(regime ``prefill``) time one eager forward of batch x length.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys

from svdllm_plugin.bench.measure import _alternate, _device_name, _timer

__all__ = ["REGIMES", "add_arguments", "run_synthetic"]

REGIMES = ("eager", "graph", "graph-fused", "graph-kernel", "latent")
# the choices of bench.synthetic.DTYPES and inference.graph.COMPILE_BACKENDS, named here so that
# `svdllm --help` does not import torch
DTYPE_NAMES = ("bf16", "fp16", "fp32")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraph")


def add_arguments(b) -> None:
    """The ``--synthetic`` options of ``svdllm bench``."""
    b.add_argument(
        "--synthetic",
        default=None,
        metavar="NAME_OR_CONFIG",
        help="random weights at a named shape (llama-7b, llama-13b, smollm2-135m) or an HF "
        "config.json, dense against factorized at --ratios (no MODEL then)",
    )
    b.add_argument("--ratios", default="0.2,0.4,0.6", help="--synthetic: fractions of parameters removed")
    b.add_argument(
        "--layers", type=int, default=None, help="--synthetic: decoder layers (default: the shape's)"
    )
    b.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="--synthetic: weight dtype (default: bf16 on CUDA, fp32 on the CPU)",
    )
    b.add_argument(
        "--decode", default="eager,graph", help=f"--synthetic: decode regimes, of {', '.join(REGIMES)}"
    )
    b.add_argument("--batches", default="1", help="--synthetic: decode batch sizes (e.g. 1,16)")
    b.add_argument("--rank-multiple", type=int, default=64, help="--synthetic: ranks are multiples of this")
    b.add_argument(
        "--compile-backend",
        choices=COMPILE_BACKENDS,
        default="inductor",
        help="torch.compile backend of the graph regimes (eager/aot_eager: trace only, quick; "
        "cudagraph: no compiler, the eager step captured by hand, CUDA only)",
    )


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise ValueError(
            f"--ratios takes fractions in (0, 1) separated by commas, e.g. 0.2,0.4; got {text!r}"
        )
    return values


def _regimes(text: str) -> list[str]:
    regimes = [r for r in text.split(",") if r]
    unknown = [r for r in regimes if r not in REGIMES]
    if not regimes or unknown:
        raise ValueError(f"--decode takes regimes of {', '.join(REGIMES)} separated by commas; got {text!r}")
    return regimes


def _bandwidth(device) -> float | None:
    """Device-memory copy bandwidth in bytes/s (read + write of 1 GiB, median of 5); None on the CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    timed = _timer(str(device))
    times = [timed(lambda: y.copy_(x)) for _ in range(6)][1:]
    return 2 * x.numel() / statistics.median(times)


def _weight_bytes_read(model) -> int:
    """Weight bytes one decode step reads: decoder layers, final norm, LM head (not the embedding)."""
    parts = [model.get_decoder().layers, model.get_decoder().norm, model.get_output_embeddings()]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def _read_bytes(model, cache, regime: str, batch: int, context: int) -> float:
    """Bytes one decode step reads: the weights and the KV cache of ``context`` positions."""
    weights = _weight_bytes_read(model)
    if regime == "latent":  # what the latent cache holds per position, measured
        from svdllm_plugin.inference import cache_nbytes

        return weights + cache_nbytes(cache) * context / max(int(cache.get_seq_length()), 1)
    return weights + _kv_bytes(model, batch, context)


def _without_compiled(model):
    """A deep copy (torch.compile's wrapper cached on the model is not copyable)."""
    saved = {
        k: model.__dict__.pop(k) for k in ("_compiled_call", "_last_compile_config") if k in model.__dict__
    }
    try:
        return copy.deepcopy(model)
    finally:
        model.__dict__.update(saved)


def _for_regime(model, regime: str, factorized: bool):
    """(model to decode with, regime of GraphDecoder, cache factory) for ``regime``."""
    if regime in ("eager", "graph") or (regime == "latent" and not factorized):
        return model, ("eager" if regime == "latent" else regime), None
    if regime == "graph-kernel" and not factorized:  # nothing to swap: the dense graph itself
        return model, "graph", None
    clone = _without_compiled(model)
    if regime == "graph-fused":
        from svdllm_plugin.inference.fused import fuse_shared_inputs

        return fuse_shared_inputs(clone, dense_groups=True), "graph", None
    if regime == "graph-kernel":
        from svdllm_plugin.inference.triton_lowrank import enable_lowrank_kernel

        enable_lowrank_kernel(clone)
        return clone, "graph", None
    from svdllm_plugin.inference.latent_cache import enable_latent_kv_cache

    _, make_cache = enable_latent_kv_cache(clone, patch_generate=False)
    return clone, "eager", make_cache


def _check(args, config, device) -> tuple:
    ratios, regimes = _floats(args.ratios), _regimes(args.decode)
    from svdllm_plugin.bench.measure import _ints, _shapes

    batches, contexts = _ints(args.batches, "--batches"), _ints(args.contexts, "--contexts")
    shapes = _shapes(args.prefill) if args.prefill else []
    if args.rank_multiple < 1:
        raise ValueError(f"--rank-multiple must be a positive integer; got {args.rank_multiple}")
    import torch

    if args.compile_backend == "cudagraph" and torch.device(device).type != "cuda":
        raise ValueError("--compile-backend cudagraph captures CUDA graphs: use --device cuda, or inductor")
    if "graph-kernel" in regimes:
        from svdllm_plugin.inference.triton_lowrank import available

        if not (available() and torch.device(device).type == "cuda"):
            print("graph-kernel skipped: it needs CUDA and Triton", file=sys.stderr)
            regimes.remove("graph-kernel")
    return ratios, regimes, batches, contexts, shapes


def run_synthetic(args, device: str) -> str:
    """Build, measure, and return the table (or one JSON line with ``--json``)."""
    import torch

    from svdllm_plugin.bench.synthetic import (
        DTYPES,
        build_dense,
        decoder_parameters,
        factorize_uniform,
        synthetic_config,
    )

    config = synthetic_config(args.synthetic, args.layers)
    ratios, regimes, batches, contexts, shapes = _check(args, config, device)
    # random weights: RoPE runs at any length, so long-context runs need no real long-context model
    longest = max(contexts + [length for _, length in shapes]) + args.decode_tokens + 1
    config.max_position_embeddings = max(config.max_position_embeddings, longest)
    dtype = DTYPES[args.dtype or ("bf16" if torch.device(device).type == "cuda" else "fp32")]
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    log(f"building {args.synthetic} ({config.num_hidden_layers} layers, {dtype}) on {device} ...")
    dense = build_dense(config, dtype, device)
    models, ranks = [(0.0, dense)], {}
    for ratio in ratios:
        model = _without_compiled(dense)
        chosen = factorize_uniform(model, ratio, args.rank_multiple)
        ranks[str(ratio)] = {"factorized": len(chosen), "ranks": sorted(set(chosen.values()))}
        models.append((ratio, model))
    results = {
        "synthetic": args.synthetic,
        "layers": config.num_hidden_layers,
        "dtype": str(dtype).removeprefix("torch."),
        "device": _device_name(device),
        "repeats": args.repeats,
        "decode_tokens": args.decode_tokens,
        "compile_backend": args.compile_backend,
        "ranks": ranks,
        "bandwidth_gb_s": None,
        "rows": [],
    }
    bandwidth = _bandwidth(device)
    results["bandwidth_gb_s"] = bandwidth and bandwidth / 1e9
    params = [decoder_parameters(m) for _, m in models]
    # every model x batch size is one more compiled graph; past the limit torch.compile would fall
    # back to eager without a word and the "graph" rows would time eager code
    import torch._dynamo

    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # older torch
    saved = getattr(dynamo, limit), dynamo.fail_on_recompile_limit_hit
    setattr(dynamo, limit, max(saved[0], 64))
    dynamo.fail_on_recompile_limit_hit = True
    try:
        with torch.inference_mode():
            timed = _timer(device)
            generator = torch.Generator().manual_seed(0)
            vocab = config.vocab_size
            results["rows"] += _prefill_rows(
                models, shapes, generator, vocab, device, args, timed, params, log
            )
            for batch in batches:
                for context in contexts:
                    ids = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
                    results["rows"] += _decode_rows(models, regimes, ids, args, timed, params, bandwidth, log)
    finally:
        setattr(dynamo, limit, saved[0])
        dynamo.fail_on_recompile_limit_hit = saved[1]
    _add_best(results["rows"])
    from svdllm_plugin.bench.decode_output import format_rows, plot_rows

    if args.plot:
        plot_rows(results, args.plot)
        log(f"plot written to {args.plot}")
    return json.dumps(results) if args.json else format_rows(results)


def _prefill_rows(models, shapes, generator, vocab, device, args, timed, params, log) -> list[dict]:
    """One eager forward of batch x length tokens (a server's prefill: logits of the last position)."""
    import torch

    rows = []
    for batch, length in shapes:
        ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
        log(f"prefill {batch}x{length} ...")
        fns = [lambda m=m: m(ids, use_cache=True, logits_to_keep=1) for _, m in models]  # noqa: B023
        stats = _alternate(models, fns, timed, args.repeats, args.warmup)
        dense_ms = stats[0]["median_s"] * 1e3
        for (ratio, _), s, p in zip(models, stats, params):
            rows.append(
                _row(ratio, "prefill", batch, length, s["median_s"] * 1e3, dense_ms, p / params[0], s)
            )
    return rows


def _row(ratio, regime, batch, context, ms, dense_ms, param_ratio, stats) -> dict:
    return {
        "ratio": ratio,
        "regime": regime,
        "batch": batch,
        "context": context,
        "ms_per_token" if regime != "prefill" else "ms": ms,
        "time_vs_dense": ms / dense_ms,
        "param_ratio": param_ratio,
        "spread": (stats["max_s"] - stats["min_s"]) / stats["median_s"],
    }


def _decode_rows(models, regimes, ids, args, timed, params, bandwidth, log) -> list[dict]:
    import gc

    import torch

    reference, rows = {}, []  # reference: ratio -> eager greedy tokens (batch, n + 1)
    for regime in regimes:
        rows += _regime_rows(models, regime, ids, args, timed, params, bandwidth, reference, log)
        gc.collect()  # the regime's clones and caches are gone: give their memory back
        if ids.is_cuda:
            torch.cuda.empty_cache()
    return rows


def _regime_rows(models, regime, ids, args, timed, params, bandwidth, reference, log) -> list[dict]:
    import torch

    from svdllm_plugin.inference.graph import GraphDecoder

    (batch, context), n = ids.shape, args.decode_tokens
    log(
        f"decode {regime}, batch {batch}, context {context}: {n} tokens x {args.warmup + args.repeats} rounds"
    )
    decoders, firsts, tokens = [], [], []
    for ratio, model in models:
        target, kind, make_cache = _for_regime(model, regime, ratio > 0)
        decoder = GraphDecoder(target, context + n + 1, kind, args.compile_backend, make_cache)
        first = decoder.prefill(ids)
        tokens.append(torch.cat([first, decoder.decode(first, n)], dim=1))  # compiles, warms up
        decoders.append(decoder)
        firsts.append(first)
        if ratio not in reference:
            reference[ratio] = tokens[-1] if regime == "eager" else _eager_tokens(model, ids, n)
    fns = [_decode_fn(d, f, context, n) for d, f in zip(decoders, firsts)]
    stats = _alternate(decoders, fns, timed, args.repeats, args.warmup)
    dense_ms = stats[0]["median_s"] * 1e3 / n
    rows = []
    for (ratio, _), d, s, p, tok in zip(models, decoders, stats, params, tokens):
        row = _row(ratio, regime, batch, context, s["median_s"] * 1e3 / n, dense_ms, p / params[0], s)
        row["read_ratio"] = _weight_bytes_read(d.model) / _weight_bytes_read(decoders[0].model)
        if regime != "eager":
            row["same_tokens"] = bool(torch.equal(tok, reference[ratio]))
        if bandwidth:
            row["floor_ms"] = _read_bytes(d.model, d.cache, regime, batch, context) / bandwidth * 1e3
            row["floor_vs_dense"] = row["floor_ms"] / rows[0]["floor_ms"] if rows else 1.0
        rows.append(row)
    return rows


def _kv_bytes(model, batch: int, context: int) -> int:
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * element * batch * context


def _eager_tokens(model, ids, n: int):
    import torch

    from svdllm_plugin.inference.graph import GraphDecoder

    decoder = GraphDecoder(model, ids.shape[1] + n + 1, "eager")
    first = decoder.prefill(ids)
    return torch.cat([first, decoder.decode(first, n)], dim=1)


def _decode_fn(decoder, first, context: int, n: int):
    def steps():
        decoder.rewind(context)
        decoder.decode(first, n)

    return steps


def _add_best(rows: list[dict]) -> None:
    """time_vs_dense_best: against the dense model's fastest decode regime at the same batch and context."""
    best = {}
    for r in rows:
        if r["ratio"] == 0.0 and r["regime"] not in ("prefill", "latent"):  # dense "latent" is eager again
            key = (r["batch"], r["context"])
            best[key] = min(best.get(key, float("inf")), r["ms_per_token"])
    for r in rows:
        if r["regime"] != "prefill":
            r["time_vs_dense_best"] = r["ms_per_token"] / best[(r["batch"], r["context"])]
