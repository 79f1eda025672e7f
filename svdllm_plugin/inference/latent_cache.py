"""Latent KV cache: cache the rank-k latent ``svd_v(x)`` of factorized k_proj / v_proj, not K and V.

SVD-LLM (section 4.2): "store the intermediate result M = W_v' x in the KV cache and
recompute the original key and value states with W_u' if required". Per token and layer the
cache then holds r_k + r_v numbers instead of 2 * kv_heads * head_dim. At attention time
the layer rebuilds, for all cached positions,

    K = RoPE(svd_u_k(M_k), cos, sin)    V = svd_u_v(M_v)

with the architecture's own RoPE function (``apply_rotary_pos_emb`` of its modeling file:
Cohere's is interleaved) and none on layers without RoPE (SmolLM3's ``no_rope_layers``).
Attentions that change K otherwise (q/k norms, partial rotary) are refused.

RoPE is position dependent, so K cannot be folded into q; the cos/sin of each cached
position are kept once for the whole model (not per layer).

It works through transformers' own interfaces, no fork of the model file:
- forward pre-hooks on ``k_proj.svd_u`` / ``v_proj.svd_u`` (present in a plain or a fused
  factorized layer) record the latent of the current call on the attention module, and a
  pre-hook on the attention module records its ``position_embeddings``;
- :class:`LatentKVCache` is a :class:`transformers.DynamicCache` whose layers'
  ``update(key_states, value_states)`` append those latents and return the rebuilt K, V.
A layer whose k_proj or v_proj is dense caches that tensor as usual.

V's up-projection folds into the output (as in Palu): softmax rows sum to one, so
``P @ (M_v W_u^T + b) = (P @ M_v) W_u^T + b``. When decoding (one query token) the cache
returns the latent itself as the value tensor (attention kernels accept a value width
different from the key width), and a pre-hook on ``o_proj`` applies each head's block of
W_u_v and the bias to the attention output: per cached token, heads x r_v multiplies
instead of rebuilding kv_heads x head_dim x r_v. Prefill (many queries) rebuilds V.

Only torch and transformers are imported (the file can sit in a checkpoint folder).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["LatentKVCache", "LatentLayer", "enable_latent_kv_cache", "cache_nbytes", "latent_layers"]

_STATE = "_svdllm_latent"  # attribute on each attention module: {"k": M_k, "v": M_v, "rope": (cos, sin)}


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules in layer order (those with ``layer_idx`` and k/v projections)."""
    found = [
        m
        for m in model.modules()
        if all(hasattr(m, name) for name in ("layer_idx", "k_proj", "v_proj", "head_dim"))
    ]
    return sorted(found, key=lambda m: m.layer_idx)


def latent_layers(model: nn.Module) -> dict[int, tuple[bool, bool]]:
    """{layer_idx: (k is factorized, v is factorized)} for every attention layer."""

    def factorized(module):
        return isinstance(getattr(module, "svd_u", None), nn.Linear)

    return {a.layer_idx: (factorized(a.k_proj), factorized(a.v_proj)) for a in _attention_modules(model)}


# Attention classes whose keys are exactly RoPE(k_proj(x)) through their module's own
# ``apply_rotary_pos_emb`` (Cohere's is interleaved), or k_proj(x) on SmolLM3's no-RoPE layers
# (``use_rope`` False). Each is checked with sharp attention in tests/inference/test_latent_cache.py;
# anything else (q/k norms, partial rotary, clipped qkv, other RoPE layouts) is refused.
SUPPORTED_ATTENTION = frozenset(
    {
        "LlamaAttention",
        "MistralAttention",
        "Qwen2Attention",
        "GraniteAttention",
        "CohereAttention",
        "SmolLM3Attention",
    }
)
_KEY_TRANSFORMS = ("k_norm", "q_norm", "qk_norm", "rotary_ndims", "clip_qkv")


def _rope_of(attn: nn.Module):
    """The architecture's own ``apply_rotary_pos_emb`` (q, k, cos, sin) -> (q, k), or None for a
    layer without RoPE; raises for an attention whose keys the cache cannot rebuild exactly."""
    name = type(attn).__name__
    transform = next((t for t in _KEY_TRANSFORMS if getattr(attn, t, None) is not None), None)
    if name not in SUPPORTED_ATTENTION or transform is not None:
        why = f"transforms K by {transform!r}" if transform else "is not one of the checked layouts"
        raise ValueError(
            f"latent KV cache: {name} {why}, so keys rebuilt from the latent would be wrong; supported: "
            f"{sorted(SUPPORTED_ATTENTION)} without q/k norms; load without latent_kv_cache"
        )
    if not getattr(attn, "use_rope", True):
        return None
    return type(attn).forward.__globals__["apply_rotary_pos_emb"]  # what its own forward calls


def _record(slot: str, attn: nn.Module, module, args):
    getattr(attn, _STATE)[slot] = args[0]


def _record_rope(attn: nn.Module, module, args, kwargs):
    state = getattr(attn, _STATE)
    state.clear()
    state["rope"] = kwargs.get("position_embeddings")


def _unfold_values(attn: nn.Module, module, args):
    """o_proj pre-hook: each head's (P @ M_v) -> (P @ M_v) W_u_v,h^T + b_h, when V was folded."""
    if not getattr(attn, _STATE).get("folded"):
        return None
    (x,) = args  # (batch, q, heads * r_v)
    svd_u = attn.v_proj.svd_u
    r_v, head_dim = svd_u.in_features, attn.head_dim
    kv_heads = svd_u.out_features // head_dim
    heads = x.shape[-1] // r_v
    W = svd_u.weight.view(kv_heads, head_dim, r_v).repeat_interleave(heads // kv_heads, dim=0)
    y = torch.einsum("bqhr,hdr->bqhd", x.view(*x.shape[:-1], heads, r_v), W)  # (batch, q, heads, head_dim)
    if svd_u.bias is not None:
        y = y + svd_u.bias.view(kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=0)
    return (y.reshape(*x.shape[:-1], heads * head_dim),)


def _clear(attn: nn.Module, module, args, output):
    getattr(attn, _STATE).clear()  # no latent outlives the attention call


def enable_latent_kv_cache(model: nn.Module, patch_generate: bool = True, fold_values: bool = True):
    """Install the latent-capturing hooks; returns ``(model, make_cache)``.

    ``make_cache()`` builds a fresh :class:`LatentKVCache` for one generation; pass it as
    ``past_key_values=make_cache()`` to ``model(...)`` or ``model.generate(...)``. With
    ``patch_generate`` (default) ``model.generate`` uses one whenever no cache is passed,
    which makes the latent cache a load-time option. ``fold_values`` (default) applies V's
    up-projection after attention when decoding (see the module docstring). Requires an
    attention of ``SUPPORTED_ATTENTION`` (keys are RoPE(k_proj(x)) or, on no-RoPE layers,
    k_proj(x)) and at least one factorized k_proj/v_proj; any other is refused.
    """
    attns = _attention_modules(model)
    kinds = latent_layers(model)
    if not any(k or v for k, v in kinds.values()):
        raise ValueError(
            "latent KV cache: no attention layer has a factorized k_proj or v_proj (svd_u, svd_v)"
        )
    for attn in attns:
        _rope_of(attn)  # refuses, before any hook, an attention the cache cannot rebuild exactly
    for attn in attns:
        if hasattr(attn, _STATE):
            continue  # hooks already installed
        setattr(attn, _STATE, {})
        attn.register_forward_pre_hook(functools.partial(_record_rope, attn), with_kwargs=True)
        attn.register_forward_hook(functools.partial(_clear, attn))
        for slot, proj in (("k", attn.k_proj), ("v", attn.v_proj)):
            if isinstance(getattr(proj, "svd_u", None), nn.Linear):
                proj.svd_u.register_forward_pre_hook(functools.partial(_record, slot, attn))
        if isinstance(getattr(attn.v_proj, "svd_u", None), nn.Linear):
            attn.o_proj.register_forward_pre_hook(functools.partial(_unfold_values, attn))
    make_cache = functools.partial(LatentKVCache, model, fold_values=fold_values)
    model._svdllm_latent_cache = make_cache
    if patch_generate and not getattr(model, "_svdllm_generate_patched", False):
        generate = model.generate

        @functools.wraps(generate)
        def generate_with_latent_cache(*args, **kwargs):
            if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
                kwargs["past_key_values"] = model._svdllm_latent_cache()  # the latest enable's options
            return generate(*args, **kwargs)

        model.generate = generate_with_latent_cache
        model._svdllm_generate_patched = True
    return model, make_cache


class _RopeStore:
    """cos/sin (batch, T, head_dim) of every cached position, shared by all layers."""

    def __init__(self):
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def append(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos = cos if self.cos is None else torch.cat([self.cos, cos], dim=-2)
        self.sin = sin if self.sin is None else torch.cat([self.sin, sin], dim=-2)

    def crop(self, length: int) -> None:
        if self.cos is not None:
            self.cos, self.sin = self.cos[..., :length, :], self.sin[..., :length, :]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.cos, self.sin) if t is not None]

    def map(self, fn) -> None:
        if self.cos is not None:
            self.cos, self.sin = fn(self.cos), fn(self.sin)

    def clear(self) -> None:
        self.cos = self.sin = None


class LatentLayer(DynamicLayer):
    """One attention layer's cache: latents for factorized k/v, plain tensors for dense ones."""

    is_croppable = True
    supports_early_init = False

    def __init__(self, attn: nn.Module, rope: _RopeStore, owns_rope: bool, fold_values: bool = True):
        super().__init__()
        self.attn, self.rope, self.owns_rope, self.fold_values = attn, rope, owns_rope, fold_values
        self.apply_rope = _rope_of(attn)
        self.latent_k: torch.Tensor | None = None  # (batch, T, r_k)
        self.latent_v: torch.Tensor | None = None  # (batch, T, r_v)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        state = getattr(self.attn, _STATE)
        M_k, M_v = state.get("k"), state.get("v")
        first = self.length == 0  # nothing cached yet: the states just computed are the whole K, V
        if M_k is not None:
            if self.owns_rope:
                self.rope.append(*state["rope"])
            self.latent_k = _cat(self.latent_k, M_k)
            keys = key_states if first else self._rebuild_keys(key_states)
        else:
            keys = self.keys = _cat(self.keys, key_states, dim=-2)
        if M_v is not None:
            self.latent_v = _cat(self.latent_v, M_v)
            if first:
                values = value_states
            elif self.fold_values and key_states.shape[-2] == 1:  # decoding: attend over the latent
                batch, kv_heads = value_states.shape[:2]
                values = self.latent_v[:, None].expand(batch, kv_heads, *self.latent_v.shape[1:])
                state["folded"] = True
            else:
                values = self._heads(self.attn.v_proj.svd_u(self.latent_v), value_states)
        else:
            values = self.values = _cat(self.values, value_states, dim=-2)
        self.length += key_states.shape[-2]
        return keys, values

    def _heads(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(batch, T, kv_heads * head_dim) -> (batch, kv_heads, T, head_dim)."""
        batch, T, _ = x.shape
        return x.view(batch, T, like.shape[1], like.shape[-1]).transpose(1, 2)

    def _rebuild_keys(self, like: torch.Tensor) -> torch.Tensor:
        K = self._heads(self.attn.k_proj.svd_u(self.latent_k), like)  # (batch, kv_heads, T, head_dim)
        if self.apply_rope is None:  # a layer without RoPE (SmolLM3's no_rope_layers)
            return K
        return self.apply_rope(K, K, self.rope.cos, self.rope.sin)[1]  # the architecture's own RoPE

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``|tokens_to_remove|`` positions (a negative count, as transformers passes)."""
        if tokens_to_remove > 0:  # legacy: the absolute length to keep
            tokens_to_remove = tokens_to_remove - self.length
        if tokens_to_remove >= 0 or self.length == 0:
            return
        keep = max(self.length - abs(tokens_to_remove), 0)
        if self.latent_k is not None:
            self.latent_k = self.latent_k[:, :keep]
        if self.latent_v is not None:
            self.latent_v = self.latent_v[:, :keep]
        if self.keys is not None:
            self.keys = self.keys[..., :keep, :]
        if self.values is not None:
            self.values = self.values[..., :keep, :]
        if self.owns_rope:
            self.rope.crop(keep)
        self.length = keep

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.latent_k, self.latent_v, self.keys, self.values) if t is not None]

    def _map(self, fn) -> None:
        for name in ("latent_k", "latent_v", "keys", "values"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        if self.owns_rope:
            self.rope.map(fn)

    def offload(self) -> None:
        """Move what this layer holds (latents, dense K/V, the shared cos/sin if it owns them) to CPU."""
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        """Empty the layer (the cache object is kept for the next generation)."""
        self.latent_k = self.latent_v = self.keys = self.values = None
        self.length = 0
        if self.owns_rope:
            self.rope.clear()

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("LatentKVCache supports greedy/sampled generation, not beam search")

    reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported


def _cat(old: torch.Tensor | None, new: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return new if old is None or old.numel() == 0 else torch.cat([old, new], dim=dim)


class LatentKVCache(DynamicCache):
    """A DynamicCache whose layers store ``svd_v(x)`` latents (see the module docstring).

    Build it with the ``make_cache`` returned by :func:`enable_latent_kv_cache`.
    """

    def __init__(self, model: nn.Module, fold_values: bool = True):
        attns = _attention_modules(model)
        if not all(hasattr(a, _STATE) for a in attns):
            raise RuntimeError("call enable_latent_kv_cache(model) before building a LatentKVCache")
        self.rope = _RopeStore()
        kinds = latent_layers(model)
        owner = min(i for i, (k, _) in kinds.items() if k) if any(k for k, _ in kinds.values()) else None
        layers = [LatentLayer(a, self.rope, a.layer_idx == owner, fold_values) for a in attns]
        super().__init__()
        self.layers = layers
        self.layer_class_to_replicate = None


def cache_nbytes(cache) -> int:
    """Bytes held by a cache: K/V tensors of a DynamicCache, latents + shared cos/sin of a LatentKVCache."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, LatentLayer):
            total += sum(t.numel() * t.element_size() for t in layer.tensors())
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None:
                    total += t.numel() * t.element_size()
    if isinstance(cache, LatentKVCache):
        total += sum(t.numel() * t.element_size() for t in cache.rope.tensors())
    return total
