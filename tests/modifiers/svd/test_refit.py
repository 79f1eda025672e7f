"""Quantization-aware factors: FactorRefitModifier refits W_u on Q(W_v) X between a GPTQ of
svd_v and a GPTQ of svd_u."""

from __future__ import annotations

import pytest
import torch
from support import run_oneshot

from svdllm_plugin.layers import SVDLinear
from svdllm_plugin.modifiers.svd import FactorRefitModifier, SVDLLMModifier


def gptq(target: str, group_size: int = 16, bits: int = 3):
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = dict(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    return GPTQModifier(config_groups={"g": dict(targets=[target], weights=weights)}, ignore=["re:.*lm_head"])


def test_refit_between_the_two_gptq_passes_lowers_the_output_error(tiny, calib, tmp_path):
    run_oneshot(tiny, calib, [SVDLLMModifier(ratio=0.4, rank_multiple=16)])
    layer = tiny.model.layers[1].mlp.gate_proj
    W_u0 = layer.svd_u.weight.detach().clone()
    refit = FactorRefitModifier()
    run_oneshot(tiny, calib, [gptq("re:.*svd_v$"), refit], pipeline="sequential")
    gains = refit.gains
    assert len(gains) == 14
    assert all(g["after"] <= g["before"] for g in gains)
    assert sum(g["after"] for g in gains) < 0.9 * sum(g["before"] for g in gains)
    assert not torch.equal(layer.svd_u.weight, W_u0)  # W_u was rewritten
    run_oneshot(tiny, calib, [gptq("re:.*svd_u$")])
    for module in tiny.modules():
        if isinstance(module, SVDLinear):
            assert module.svd_u.quantization_scheme is not None
            assert module.svd_v.quantization_scheme is not None
    from svdllm_plugin.checkpoint import save_pretrained
    from svdllm_plugin.export import read_quantized_weights

    save_pretrained(tiny, tmp_path / "ckpt")  # both GPTQ passes pack into one checkpoint
    weights = read_quantized_weights(tmp_path / "ckpt")
    assert any(name.endswith("svd_u") for name in weights) and any(name.endswith("svd_v") for name in weights)


def test_refit_needs_factorized_layers(tiny, calib):
    with pytest.raises(ValueError, match="no SVDLinear"):
        run_oneshot(tiny, calib, [FactorRefitModifier()])


def test_sigma_auto_puts_sigma_on_svd_v_when_the_factors_are_quantized(
    tiny_factory, tokenizer, calib, tmp_path
):
    """With a later GPTQ of the factors, W_u = U_k (orthonormal columns of even scale): a dominant
    sigma_1 no longer dwarfs the other columns of its quantization group."""
    from transformers import AutoModelForCausalLM

    tiny_factory().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    alone = SVDLLMModifier(ratio=0.4, rank_multiple=16)
    run_oneshot(AutoModelForCausalLM.from_pretrained(tmp_path), calib, [alone])
    assert alone.sigma == "auto" and alone.fit.sigma == "split"
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    stacked = SVDLLMModifier(ratio=0.4, rank_multiple=16)
    run_oneshot(model, calib, [stacked, gptq("Linear", bits=8)])
    assert stacked.fit.sigma == "v" and stacked.fit.rotate and not alone.fit.rotate
    W_u = model.model.layers[0].mlp.up_proj.svd_u.weight.double()
    gram = W_u.T @ W_u  # ~ I up to 8-bit rounding
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=0.05, rtol=0)
    assert SVDLLMModifier(sigma="split").sigma == "split"


def test_rotation_keeps_the_product_and_couples_svd_u_inputs():
    from svdllm_plugin.modifiers.svd.decompose import factorize, rotate_factors, whiten_cholesky

    g = torch.Generator().manual_seed(0)
    X = (
        torch.randn(24, 300, generator=g, dtype=torch.float64)
        * torch.linspace(0.1, 10, 24, dtype=torch.float64)[:, None]
    )
    W = torch.randn(16, 24, generator=g, dtype=torch.float64)
    f = factorize(W, 8, whiten_cholesky(X @ X.T), sigma_on="v")
    W_u, W_v = rotate_factors(f.W_u, f.W_v)
    torch.testing.assert_close(W_u @ W_v, f.W_u @ f.W_v)
    H_plain, H_rot = (V @ X @ X.T @ V.T for V in (f.W_v, W_v))  # svd_u's input Hessians
    off = lambda H: float((H - torch.diag(H.diagonal())).norm() / H.norm())  # noqa: E731
    assert off(H_plain) < 1e-8 and off(H_rot) > 0.1  # diagonal: GPTQ can compensate nothing
