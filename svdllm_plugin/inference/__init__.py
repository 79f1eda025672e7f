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
"""

from .fused import DEFAULT_GROUPS, fuse_shared_inputs, is_factorized
from .latent_cache import LatentKVCache, cache_nbytes, enable_latent_kv_cache, latent_layers

__all__ = [
    "DEFAULT_GROUPS",
    "fuse_shared_inputs",
    "is_factorized",
    "LatentKVCache",
    "cache_nbytes",
    "enable_latent_kv_cache",
    "latent_layers",
]
