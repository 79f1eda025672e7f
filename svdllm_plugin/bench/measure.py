"""Measurements of `svdllm bench`: models under test (``Variant``), timers, and ``benchmark``.

Models are measured ALTERNATELY inside one process (every repetition runs each model once, in
turn), so machine noise hits all of them; the figures are medians over the repetitions after
warm-up. This module imports nothing heavy at import time.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

from svdllm_plugin.bench.macs import decode_macs, prefill_macs, weight_bytes

__all__ = ["Variant", "load_variant", "benchmark"]


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
