"""Arithmetic of `svdllm bench`: weight bytes and multiply-accumulates per token of a model,
the ratios the measured speedups are compared with (imports nothing heavy at import time)."""

from __future__ import annotations

__all__ = ["weight_bytes", "linear_macs_per_token", "prefill_macs", "decode_macs"]


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
