"""Runtime features for factorized models (imports only torch and transformers).

- :func:`fuse_shared_inputs` (``fused.py``): q/k/v (and gate/up) factors that read the same
  input run as one GEMM over their stacked W_v.
- :func:`enable_latent_kv_cache` (``latent_cache.py``): cache ``svd_v(x)`` of factorized
  k_proj/v_proj instead of K and V; K (with RoPE) and V are rebuilt at attention time.

Both recognise factorized layers by duck typing (``svd_u``/``svd_v`` Linear children), so
the files can be copied next to a checkpoint's ``modeling_*.py``::

    model = fuse_shared_inputs(model)                   # optional, before the cache hooks
    model, make_cache = enable_latent_kv_cache(model)   # model.generate now uses it
    out = model(input_ids, past_key_values=make_cache(), use_cache=True)

or both at once, as a load-time option: ``prepare_for_inference(model, latent_kv_cache=True)``.
"""

from .fused import DEFAULT_GROUPS, fuse_shared_inputs, is_factorized
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
]


def prepare_for_inference(model, fuse: bool | None = False, latent_kv_cache: bool = False):
    """Apply the runtime options to a loaded model, in place; returns it.

    :param fuse: one GEMM per shared-input group; ``None`` fuses when the model has factorized
        layers. Off by default: measured within noise of unfused on CPU and on an H200
        (README, Inference section).
    :param latent_kv_cache: ``model.generate`` caches ``svd_v(x)`` of factorized k/v; the
        cache factory is ``model._svdllm_latent_cache``.
    """
    if fuse is None:
        fuse = any(is_factorized(m) for m in model.modules())
    if fuse:
        fuse_shared_inputs(model)
    if latent_kv_cache:
        enable_latent_kv_cache(model)
    return model
