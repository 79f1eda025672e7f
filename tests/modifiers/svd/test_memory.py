"""O(one decoder layer) memory: what SVDLLMModifier holds between decoder layers, for every option;
the original activation stream of the closed-form update; exact statistics; no inverse of S."""

from __future__ import annotations

import pytest
import torch
from support import run_oneshot
from support.factors import held_after_each_layer
from torch import nn
from transformers import AutoModelForCausalLM

from svdllm_plugin.layers import SVDLinear
from svdllm_plugin.modifiers.svd import SVDLLMModifier, passes
from svdllm_plugin.modifiers.svd.decompose import factorize, whiten_cholesky


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory, save_tiny):
    return save_tiny(tmp_path_factory.mktemp("memory") / "tiny3", hidden=64, layers=3)


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(allocation="loss"),
        dict(allocation="sensitivity", sensitivity_batches=1, sensitivity_ratios=[0.2, 0.6]),
        dict(closed_form_update=True),
        dict(closed_form_update=True, intra_layer=True),
        dict(method="fwsvd", fisher_batches=1),
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items())[:30] or "uniform",
)
def test_between_layers_the_modifier_holds_only_vectors(three_layers, calib, settings):
    """After each decoder layer's epoch: no X X^T and no factor matrix of any layer is held, only
    per-matrix vectors (spectra, Fisher row scales): at most sum (m + n) numbers, plus, for the
    closed-form update, the original stream's one copy of the next layer's input hidden states."""
    model = AutoModelForCausalLM.from_pretrained(three_layers)
    held = held_after_each_layer(model, calib, SVDLLMModifier(ratio=0.4, **settings))
    vectors = sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, SVDLinear))
    stream = len(calib) * len(calib[0]["input_ids"]) * model.config.hidden_size
    allowed = vectors + (stream if settings.get("closed_form_update") else 0)
    assert len(held) == 3 + 1 and max(held) <= allowed, held


def test_closed_form_update_whitens_with_the_original_model_statistics(three_layers, calib):
    """The original stream carried beside the propagated one gives exactly the X X^T of a separate
    pass over the dense model (what the update used to collect for every layer up front)."""
    dense = AutoModelForCausalLM.from_pretrained(three_layers)
    model = AutoModelForCausalLM.from_pretrained(three_layers)
    layers = {n: m for n, m in dense.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}
    expected = passes.collect_statistics(dense, layers, _loader(calib))
    seen: dict[str, torch.Tensor] = {}
    factors = SVDLLMModifier._factors

    def spy(self, name, whitened):
        layer = self._layers[name]
        seen[name] = self._original.get(layer).H.clone()
        seen[name + "/propagated"] = self._collector.get(layer).H.clone()
        return factors(self, name, whitened)

    SVDLLMModifier._factors = spy
    try:
        run_oneshot(model, calib, SVDLLMModifier(ratio=0.4, closed_form_update=True))
    finally:
        SVDLLMModifier._factors = factors
    assert len(seen) == 2 * len(layers)
    for name, linear in layers.items():
        H = expected.get(linear).H
        torch.testing.assert_close(seen[name].cpu(), H.cpu(), rtol=1e-6, atol=1e-6 * H.abs().max().item())
    # the second layer's propagated inputs come from the compressed first layer: they differ
    q1 = "model.layers.1.self_attn.q_proj"
    assert not torch.allclose(seen[q1 + "/propagated"], seen[q1], rtol=1e-3)


def _loader(calib):
    return [
        {k: torch.tensor([calib[i][k]]) for k in ("input_ids", "attention_mask")} for i in range(len(calib))
    ]


@pytest.mark.parametrize("sigma_on", ["split", "u", "v"])
@pytest.mark.parametrize("weighting", ["whitening", "diagonal", "rows"])
def test_factors_without_an_inverse_equal_the_inverse_formula(sigma_on, weighting):
    """W_v = (right_k / Sigma_k) U_k^T W equals right_k V_k^T S^-1 for every Sigma placement."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g, dtype=torch.float64)
    mix = torch.randn(40, 40, generator=g, dtype=torch.float64)
    X = mix @ torch.randn(40, 200, generator=g, dtype=torch.float64)
    k, rows = 9, None
    if weighting == "whitening":
        S = whiten_cholesky(X @ X.T)
    elif weighting == "diagonal":
        S = X.abs().mean(1) ** 0.5
    else:
        S, rows = None, torch.rand(24, generator=g, dtype=torch.float64) + 0.5
    f = factorize(W, k, S, row_scale=rows, sigma_on=sigma_on)
    S_full = torch.eye(40, dtype=torch.float64) if S is None else (torch.diag(S) if S.dim() == 1 else S)
    r = torch.ones(24, dtype=torch.float64) if rows is None else rows
    U, sigma, Vh = torch.linalg.svd(r[:, None] * W @ S_full)
    right = {"split": sigma[:k].sqrt(), "u": torch.ones(k, dtype=torch.float64), "v": sigma[:k]}[sigma_on]
    W_v = right[:, None] * Vh[:k] @ torch.linalg.inv(S_full)
    signs = torch.sign((f.W_v * W_v).sum(1))  # singular vectors are defined up to sign
    torch.testing.assert_close(f.W_v, signs[:, None] * W_v)
    W_k = (U[:, :k] * sigma[:k]) @ Vh[:k] @ torch.linalg.inv(S_full) / r[:, None]
    torch.testing.assert_close(f.W_u @ f.W_v, W_k)


def test_a_second_cholesky_failure_falls_back_to_eigh(monkeypatch):
    H = torch.randn(16, 16, dtype=torch.float64)
    H = H @ H.T
    real = torch.linalg.cholesky_ex

    def always_fails(A, **kwargs):
        L, info = real(A, **kwargs)
        return L, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", always_fails)
    S = whiten_cholesky(H, "broken")
    torch.testing.assert_close(S @ S.T, H)


def test_statistics_are_accumulated_in_float64_per_batch():
    from svdllm_plugin.modifiers.svd.statistics import InputStatistics

    x = torch.full((1, 3, 4), 1.0 + 2**-20, dtype=torch.float64)  # not representable in float32
    stats = InputStatistics.empty(4, "cpu")
    stats.add(x, frozenset({"H"}))
    assert stats.H[0, 0].item() == 3 * (1.0 + 2**-20) ** 2


@pytest.mark.parametrize("method", ["svd", "fwsvd", "asvd"])
def test_methods_that_never_read_xxt_hold_none(tiny, calib, method):
    """svd / fwsvd / asvd read no X X^T: their statistics hold no n x n matrix (it used to be
    allocated as zeros, 1.4 GB per 7B down_proj input)."""
    from svdllm_plugin.modifiers.svd.statistics import InputStatistics

    held = []
    real = InputStatistics.empty.__func__

    def spy(cls, n, device, want=frozenset({"H", "abs"})):
        stats = real(cls, n, device, want)
        held.append(stats.H.numel())
        return stats

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InputStatistics, "empty", classmethod(spy))
        run_oneshot(tiny, calib, SVDLLMModifier(ratio=0.4, method=method, fisher_batches=1))
    assert held and set(held) == {0}


def test_held_numel_sees_the_held_layer_inputs():
    """The memory tests count what the modifier's plain helper objects hold too (they used to see
    only dicts, lists and dataclasses, so held layer inputs counted 0)."""
    from support.factors import held_numel

    from svdllm_plugin.modifiers.svd.intra import LayerInputs

    inputs = LayerInputs()
    layer = nn.Linear(4, 4)
    inputs.pre_hook(layer, (torch.zeros(2, 3, 4),), {})
    assert held_numel([inputs]) == 24
    inputs.release()
    assert held_numel([inputs]) == 0
