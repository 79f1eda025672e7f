"""Graph-captured decode: a static KV cache and a compiled one-token step (CUDA graphs on a GPU).

Eager decode of a factorized model is bound by kernel launches and Python, not by the bytes
it reads: factorization doubles the number of GEMMs, so on a GPU it decodes slower than the
dense model although it reads fewer weights. Capturing the whole one-token step removes the
per-launch cost. This is what gpt-fast does and what transformers' own ``generate`` does with
``cache_implementation="static"`` and a ``CompileConfig``:

- the KV cache is a :class:`transformers.StaticCache` (preallocated, updated in place, so
  every step has the same shapes and the same tensor addresses);
- prefill runs eagerly (its shapes vary); the one-token step runs through
  ``model.get_compiled_call(config)``, i.e. ``torch.compile`` with ``mode="reduce-overhead"``
  on CUDA (inductor + CUDA graphs) and inductor's default mode on the CPU.

:class:`GraphDecoder` is the loop the benchmark times; :func:`enable_graph_decode` makes
``model.generate`` use the same path by default (a load-time option of compressed folders).
Only torch and transformers are imported: the file is copied into checkpoint folders.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.generation.configuration_utils import CompileConfig

__all__ = [
    "DECODE_REGIMES",
    "COMPILE_BACKENDS",
    "compile_config",
    "GraphDecoder",
    "greedy_tokens",
    "enable_graph_decode",
]

DECODE_REGIMES = ("eager", "graph")
# inductor: the fast one; "eager"/"aot_eager" trace the same graph without code generation
# (seconds instead of a minute to compile on a small CPU: what tests use); "cudagraph": no
# compiler, the eager step captured by hand in one CUDA graph (CUDA only; no compile time)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraph")


def compile_config(device: torch.device | str, backend: str = "inductor") -> CompileConfig:
    """``torch.compile`` settings for the one-token step on ``device``.

    One static graph (``fullgraph``, ``dynamic=False``): a graph break or a recompilation
    would bring back the launch overhead this path exists to remove. CUDA graphs
    (``reduce-overhead``) only with inductor on CUDA.
    """
    if backend not in COMPILE_BACKENDS or backend == "cudagraph":
        raise ValueError(f"compile backend must be one of {COMPILE_BACKENDS[:3]}; got {backend!r}")
    cuda = torch.device(device).type == "cuda"
    mode = "reduce-overhead" if cuda and backend == "inductor" else None
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=mode)
    config._compile_all_devices = True  # transformers compiles only on GPUs unless told
    return config


def _rewind(cache: StaticCache, length: int) -> None:
    """Make the cache hold its first ``length`` positions again (later ones are overwritten)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.cumulative_length.fill_(length)  # in place: its address is baked into the graph


class GraphDecoder:
    """Greedy decode with a static cache; the one-token step compiled (``regime="graph"``) or not.

    ``regime="eager"`` runs the same loop uncompiled with transformers' DynamicCache (what
    ``generate`` does by default), or the cache ``make_cache()`` returns: the reference for
    tokens and for time.

        decoder = GraphDecoder(model, max_length=prompt + new, regime="graph")
        first = decoder.prefill(input_ids)        # (batch, 1)
        tokens = decoder.decode(first, new - 1)   # (batch, new - 1)
        decoder.rewind(prompt)                    # time the same decode again
    """

    def __init__(
        self,
        model: nn.Module,
        max_length: int,
        regime: str = "graph",
        backend: str = "inductor",
        make_cache=None,
    ):
        if regime not in DECODE_REGIMES:
            raise ValueError(f"decode regime must be one of {DECODE_REGIMES}; got {regime!r}")
        if make_cache is not None and regime != "eager":
            raise ValueError("make_cache is for the eager regime: the graph regime needs its StaticCache")
        self.model, self.max_length, self.regime = model, max_length, regime
        device = next(model.parameters()).device
        if regime == "eager":
            self.step = model
        elif backend == "cudagraph":
            if device.type != "cuda":
                raise ValueError(
                    "the cudagraph backend needs a model on a CUDA device; use inductor elsewhere"
                )
            self.step = _CapturedStep(model)
        else:
            self.step = model.get_compiled_call(compile_config(device, backend))
        self.make_cache = make_cache  # eager only: e.g. the latent KV cache's factory
        self.cache = None
        self.length = 0

    def _new_cache(self):
        if self.make_cache is not None:
            return self.make_cache()
        if self.regime == "eager":
            return DynamicCache()
        return StaticCache(config=self.model.config, max_cache_len=self.max_length)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Fill a fresh cache with the prompt (eagerly); the greedy next token (batch, 1)."""
        if input_ids.shape[1] >= self.max_length:
            raise ValueError(
                f"prompt of {input_ids.shape[1]} tokens leaves no room in max_length={self.max_length}"
            )
        self.cache = self._new_cache()
        out = self.model(input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.length = input_ids.shape[1]
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def decode(self, token: torch.Tensor, steps: int) -> torch.Tensor:
        """Feed ``token`` (batch, 1) and ``steps - 1`` greedy successors; the ``steps`` next tokens."""
        if self.length + steps > self.max_length:
            raise ValueError(f"{steps} more tokens exceed max_length={self.max_length} (at {self.length})")
        tokens = []
        for _ in range(steps):
            out = self.step(input_ids=token, past_key_values=self.cache, use_cache=True)
            # clone: with CUDA graphs the logits live in a buffer the next replay overwrites
            token = out.logits[:, -1].argmax(-1, keepdim=True).clone()
            tokens.append(token)
        self.length += steps
        return torch.cat(tokens, dim=1)

    def rewind(self, length: int) -> None:
        """Back to the first ``length`` cached positions (to time the same decode again)."""
        if self.make_cache is not None or self.regime == "eager":
            extra = self.cache.get_seq_length() - length
            if extra > 0:
                self.cache.crop(-extra)  # a negative crop drops the last positions
        else:
            _rewind(self.cache, length)
        self.length = length


class _CapturedStep:
    """The eager one-token step recorded once in a CUDA graph, then replayed (no compiler).

    Capture records kernels without running them; the warm-up step before it does run, so the
    cache's lengths are put back after it. Inputs are copied into the captured buffer; the
    logits come back in the graph's own output buffer (the caller clones what it keeps).
    """

    def __init__(self, model: nn.Module):
        self.model, self.graph, self.cache = model, None, None

    def _capture(self, input_ids, cache):
        self.ids, self.cache = input_ids.clone(), cache
        lengths = [layer.cumulative_length.clone() for layer in cache.layers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, cuBLAS handles)
            self.model(input_ids=self.ids, past_key_values=cache, use_cache=True)
        torch.cuda.current_stream().wait_stream(stream)
        for layer, length in zip(cache.layers, lengths):
            layer.cumulative_length.copy_(length)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.model(input_ids=self.ids, past_key_values=cache, use_cache=True)

    def __call__(self, input_ids, past_key_values, use_cache=True):
        if self.graph is None or past_key_values is not self.cache or input_ids.shape != self.ids.shape:
            self._capture(input_ids, past_key_values)
        self.ids.copy_(input_ids)
        self.graph.replay()
        return self.out


@torch.inference_mode()
def greedy_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int,
    regime: str = "graph",
    backend: str = "inductor",
) -> torch.Tensor:
    """The ``new_tokens`` greedy continuation (batch, new_tokens) through ``regime``."""
    decoder = GraphDecoder(model, input_ids.shape[1] + new_tokens, regime, backend)
    first = decoder.prefill(input_ids)
    if new_tokens == 1:
        return first
    return torch.cat([first, decoder.decode(first, new_tokens - 1)], dim=1)


def enable_graph_decode(model: nn.Module, backend: str = "inductor", device=None) -> nn.Module:
    """Make ``model.generate`` decode with a static cache and the compiled step; returns ``model``.

    Sets ``generation_config.cache_implementation = "static"`` and its ``compile_config``
    (transformers then compiles the decoding forward itself). Refused on a model whose
    ``generate`` passes the latent KV cache (a dynamic cache: transformers rejects a cache object
    together with ``cache_implementation``). ``device`` picks the compile mode (default: CUDA
    when available, since a folder is often loaded on the CPU and moved afterwards).
    """
    if getattr(model, "_svdllm_latent_cache", None) is not None:
        raise ValueError(
            "graph decode needs a static KV cache, and this model decodes with the latent KV cache: "
            "use one of decode: graph and latent_kv_cache"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = compile_config(device, backend)
    return model
