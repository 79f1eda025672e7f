"""Runtime features for factorized models (imports only torch and transformers).

- :func:`fuse_shared_inputs` (``fused.py``): q/k/v (and gate/up) factors that read the same
  input run as one GEMM over their stacked W_v.
- :func:`enable_latent_kv_cache` (``latent_cache.py``): cache ``svd_v(x)`` of factorized
  k_proj/v_proj instead of K and V; K (with RoPE) and V are rebuilt at attention time.
- :func:`enable_graph_decode` (``graph.py``): ``generate`` decodes with a static KV cache and
  a compiled one-token step (CUDA graphs on a GPU); :class:`GraphDecoder` is that loop.
- ``triton_lowrank.py``: y = U (V x) in one Triton launch for small batches (CUDA only).

Both recognise factorized layers by duck typing (``svd_u``/``svd_v`` Linear children), so
the files can be copied next to a checkpoint's ``modeling_*.py``::

    model = fuse_shared_inputs(model)                   # optional, before the cache hooks
    model, make_cache = enable_latent_kv_cache(model)   # model.generate now uses it
    out = model(input_ids, past_key_values=make_cache(), use_cache=True)

or both at once, as a load-time option: ``prepare_for_inference(model, latent_kv_cache=True)``.
"""

from .fused import DEFAULT_GROUPS, fuse_shared_inputs, is_factorized
from .graph import GraphDecoder, enable_graph_decode, greedy_tokens
from .latent_cache import LatentKVCache, cache_nbytes, enable_latent_kv_cache, latent_layers

__all__ = [
    "prepare_for_inference",
    "DEFAULT_GROUPS",
    "fuse_shared_inputs",
    "is_factorized",
    "LatentKVCache",
    "cache_nbytes",
    "enable_latent_kv_cache",
    "latent_layers",
    "GraphDecoder",
    "enable_graph_decode",
    "greedy_tokens",
]


def prepare_for_inference(
    model, fuse: bool | None = False, latent_kv_cache: bool = False, decode: str = "eager"
):
    """Apply the runtime options to a loaded model, in place; returns it.

    :param fuse: one GEMM per shared-input group; ``None`` fuses when the model has factorized
        layers. Off by default: measured within noise of unfused on CPU and on an H200
        (README, Inference section).
    :param latent_kv_cache: ``model.generate`` caches ``svd_v(x)`` of factorized k/v; the
        cache factory is ``model._svdllm_latent_cache``.
    :param decode: ``"graph"``: ``model.generate`` uses a static cache and a compiled step
        (:func:`enable_graph_decode`; a latent cache, not being static, still decodes eagerly).
    """
    if decode not in ("eager", "graph"):
        raise ValueError(f"decode must be 'eager' or 'graph'; got {decode!r}")
    if fuse is None:
        fuse = any(is_factorized(m) for m in model.modules())
    if fuse:
        fuse_shared_inputs(model)
    if latent_kv_cache:
        enable_latent_kv_cache(model)
    if decode == "graph":
        enable_graph_decode(model)
    return model
