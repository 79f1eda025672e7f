"""Runtime features of factorized models: fused shared-input factors and the latent KV cache."""

from __future__ import annotations

import pytest
import torch
from support.factors import factorize_ratio as factorize
from support.factors import greedy
from transformers import DynamicCache

from svdllm_plugin.inference import cache_nbytes, enable_latent_kv_cache, fuse_shared_inputs


@pytest.fixture
def tiny_svd(tiny_factory):
    return factorize(tiny_factory())  # RoPE has no hard length limit: 272 positions are fine


@pytest.mark.parametrize("fold_values", [True, False])
def test_latent_cache_greedy_is_exact(tiny_factory, fold_values):
    """256 greedy tokens with the latent cache: same tokens, same logits (fp32 rounding) as DynamicCache."""
    tiny_svd = factorize(tiny_factory(attention_bias=True))  # biases ride on svd_u: folded V adds them after
    with torch.no_grad():
        for name, param in tiny_svd.named_parameters():
            if name.endswith("svd_u.bias"):  # initialized to zero: make them count
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    prompt = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    ref_tokens, ref_logits = greedy(tiny_svd, prompt, 256, DynamicCache())
    model, make_cache = enable_latent_kv_cache(tiny_svd, fold_values=fold_values)
    widths = set()
    o_proj = model.model.layers[1].self_attn.o_proj
    o_proj.register_forward_pre_hook(lambda module, args: widths.add(args[0].shape[-1]), prepend=True)
    cache = make_cache()
    tokens, logits = greedy(model, prompt, 256, cache)
    r_v = model.model.layers[1].self_attn.v_proj.rank
    assert widths == ({64, 4 * r_v} if fold_values else {64})  # decoding attended over the latent
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    # stored: r_k + r_v latents per layer (+ cos/sin once) instead of 2 * kv_heads * head_dim
    assert cache.get_seq_length() == 16 + 256
    dense = DynamicCache()
    with torch.no_grad():
        tiny_svd(tokens, past_key_values=dense, use_cache=True)
    assert cache_nbytes(cache) < 0.7 * cache_nbytes(dense)


def test_latent_cache_generate_and_fused(tiny_factory):
    """generate() picks the latent cache up by itself, also on a fused model with a dense k_proj."""
    model = factorize(tiny_factory(), keep_dense=("layers.0.self_attn.k_proj",))
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(prompt, **kwargs)
        fuse_shared_inputs(model)
        assert model._svdllm_fused_groups == 4  # q/k/v and gate/up of both layers
        enable_latent_kv_cache(model)
        out = model.generate(prompt, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)


def test_fused_matches_unfused(tiny_svd):
    x = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny_svd(x).logits
        params = sum(p.numel() for p in tiny_svd.parameters())
        fuse_shared_inputs(tiny_svd)
        fused = tiny_svd(x).logits
    assert sum(p.numel() for p in tiny_svd.parameters()) == params
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    attn = tiny_svd.model.layers[0].self_attn
    assert hasattr(attn, "q_proj_v_proj_in") and hasattr(attn.k_proj, "svd_u")


def test_latent_cache_needs_factorized_kv(tiny_factory):
    with pytest.raises(ValueError, match="factorized k_proj or v_proj"):
        enable_latent_kv_cache(tiny_factory())


def test_latent_cache_crop(tiny_svd):
    """crop() (used by assisted decoding) rolls latents and positions back."""
    model, make_cache = enable_latent_kv_cache(tiny_svd)
    x = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(3))
    cache = make_cache()
    with torch.no_grad():
        model(x[:, :12], past_key_values=cache, use_cache=True)
        model(x[:, 12:16], past_key_values=cache, use_cache=True)
        cache.crop(-4)
        assert cache.get_seq_length() == 12
        a = model(x[:, 12:], past_key_values=cache, use_cache=True).logits
        b = model(x).logits[:, 12:]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_prepare_for_inference_fuses_only_factorized(tiny_factory, tiny_svd):
    from svdllm_plugin.inference import prepare_for_inference

    dense = prepare_for_inference(tiny_factory(), fuse=None)
    assert not getattr(dense, "_svdllm_fused_groups", 0)
    model = prepare_for_inference(tiny_svd, fuse=None, latent_kv_cache=True)
    assert model._svdllm_fused_groups == 4 and callable(model._svdllm_latent_cache)


def test_latent_cache_reset_offload_prefetch(tiny_svd):
    """reset() empties the latents (a reused cache decodes like a fresh one); offload() / prefetch()
    move what the layers hold and decoding goes on unchanged."""
    model, make_cache = enable_latent_kv_cache(tiny_svd)
    prompt = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(3))
    ref_tokens, ref_logits = greedy(model, prompt, 8, make_cache())
    cache = make_cache()
    greedy(model, prompt, 5, cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache_nbytes(cache) == 0
    tokens, logits = greedy(model, prompt, 8, cache)  # the reset cache, reused
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for layer in cache.layers:
        layer.offload()
        layer.prefetch()
    assert cache.get_seq_length() == tokens.shape[1]  # greedy fed its last token too
    new = torch.tensor([[7]])
    with torch.no_grad():
        out = model(new, past_key_values=cache, use_cache=True)
        full = model(torch.cat([tokens, new], dim=1)).logits[:, -1]
    torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-4, atol=1e-4)
