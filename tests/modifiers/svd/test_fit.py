"""Every method and rank allocation on the tiny model, and the loss ordering theory gives."""

import pytest
import torch
from support import run_oneshot

from svdllm_plugin import SVDLLMModifier
from svdllm_plugin.layers import factorized_ranks
from svdllm_plugin.modifiers.svd.allocation import (
    Matrix,
    allocate_by_loss,
    allocate_by_sensitivity,
    matrix_type,
)
from svdllm_plugin.modifiers.svd.decompose import factorize, refit_u, whiten_cholesky


def outlier_inputs(n=48, tokens=600, seed=0):
    """Correlated inputs with a few large channels, as in LLM activations."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=g, dtype=torch.float64) @ torch.randn(
        n, tokens, generator=g, dtype=torch.float64
    )
    X[:4] *= 20.0
    return X  # (n, tokens)


def test_loss_ordering_whitened_le_activation_scaled_le_plain():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 48, generator=g, dtype=torch.float64)
    X = outlier_inputs()
    S = whiten_cholesky(X @ X.T)
    s = X.abs().mean(1) ** 0.5  # ASVD abs-mean scaling, alpha 0.5
    loss = lambda f: ((W - f.W_u @ f.W_v) @ X).pow(2).sum().item()  # noqa: E731
    for k in (4, 12, 24):
        whitened = loss(factorize(W, k, S))
        scaled = loss(factorize(W, k, s))
        plain = loss(factorize(W, k))
        assert whitened <= scaled <= plain


def test_row_scaling_undoes_itself():
    W = torch.randn(16, 24, dtype=torch.float64)
    f = factorize(W, 24, row_scale=torch.rand(16, dtype=torch.float64) + 0.5)  # full rank: exact
    torch.testing.assert_close(f.W_u @ f.W_v, W)


def test_refit_u_is_least_squares_optimal_on_new_inputs():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(32, 48, generator=g, dtype=torch.float64)
    X, X2 = outlier_inputs(seed=1), outlier_inputs(seed=2)  # whitening data, propagated data
    S = whiten_cholesky(X @ X.T)
    f = factorize(W, 10, S)
    W_u = refit_u(W, f.W_v, X2 @ X2.T, damp=0.0)
    before = ((W - f.W_u @ f.W_v) @ X2).pow(2).sum()
    after = ((W - W_u @ f.W_v) @ X2).pow(2).sum()
    assert after <= before
    perturbed = W_u + 1e-3 * torch.randn_like(W_u)
    assert after <= ((W - perturbed @ f.W_v) @ X2).pow(2).sum()


def _matrices():
    g = torch.Generator().manual_seed(5)
    flat, steep = (
        torch.linspace(1, 0.5, 32, dtype=torch.float64),
        torch.logspace(0, -4, 32, dtype=torch.float64),
    )
    return [
        Matrix("model.layers.0.mlp.up_proj", 32, 32, flat),
        Matrix("model.layers.1.mlp.up_proj", 32, 32, steep),
        Matrix(
            "model.layers.0.self_attn.q_proj",
            32,
            32,
            torch.rand(32, generator=g).sort(descending=True).values,
        ),
    ]


def test_loss_allocation_keeps_each_type_budget_and_moves_rank_to_flat_spectra():
    mats = _matrices()
    uniform = {m.name: 8 for m in mats}
    ranks = allocate_by_loss(mats, uniform)
    assert ranks["model.layers.0.mlp.up_proj"] + ranks["model.layers.1.mlp.up_proj"] == 16
    assert ranks["model.layers.0.mlp.up_proj"] > ranks["model.layers.1.mlp.up_proj"]
    assert ranks["model.layers.0.self_attn.q_proj"] == 8  # alone in its type
    assert matrix_type("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"


def test_sensitivity_allocation_meets_target_within_one_rank_step():
    mats = _matrices()
    ppl = {m.name: {r: 10 + 100 * r * (i + 1) for r in (0.1, 0.3, 0.5, 0.7, 0.9)} for i, m in enumerate(mats)}
    target = 3 * 32 * 32 // 2  # remove half of all parameters
    ranks = allocate_by_sensitivity(mats, ppl, target)
    removed = sum(m.m * m.n - ranks[m.name] * (m.m + m.n) for m in mats)
    assert 0 <= removed - target < 64  # within one rank step (m + n = 64)
    assert ranks[mats[0].name] < ranks[mats[2].name]  # the less sensitive matrix is cut more


@pytest.mark.parametrize(
    "settings",
    [
        dict(method="svd"),
        dict(method="asvd", asvd_statistic="abs_max", asvd_alpha=0.5),
        dict(method="fwsvd", fisher_batches=2),
        dict(allocation="loss"),
        dict(allocation="sensitivity", sensitivity_batches=1, sensitivity_ratios=[0.2, 0.6]),
        dict(closed_form_update=True),
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items())[:40],
)
def test_each_method_runs_through_oneshot_and_meets_the_budget(tiny, calib, settings):
    modifier = SVDLLMModifier(ratio=0.4, **settings)
    run_oneshot(tiny, calib, modifier)
    ranks = factorized_ranks(tiny)
    assert len(ranks) == 14
    shapes = {n: (m.out_features, m.in_features) for n, m in tiny.named_modules() if n in ranks}
    removed = sum(m * n - ranks[name] * (m + n) for name, (m, n) in shapes.items())
    target = sum(m * n - (m * n * 6 // 10 // (m + n)) * (m + n) for m, n in shapes.values())
    assert abs(removed - target) <= max(m + n for m, n in shapes.values())
    if settings.get("allocation") == "sensitivity":
        assert modifier.sensitivity_cost["evaluations"] == 14 * 2


def test_model_ratio_spreads_a_whole_model_budget(tiny, calib):
    whole = sum(p.numel() for p in {id(p): p for p in tiny.parameters()}.values())
    run_oneshot(tiny, calib, SVDLLMModifier(model_ratio=0.004, targets=["re:.*mlp\\..*_proj$"]))
    after = sum(p.numel() for p in {id(p): p for p in tiny.parameters()}.values())
    assert abs((whole - after) / whole - 0.004) < 0.001


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(allocation="loss", activations="propagated"), "activations: original"),
        (dict(closed_form_update=True, allocation="loss"), "allocation: uniform"),
        (dict(closed_form_update=True, method="asvd"), "svd_llm"),
        (dict(model_ratio=1.2), "model_ratio"),
        (dict(sensitivity_ratios=[0.0, 0.5]), "sensitivity_ratios"),
        (dict(asvd_statistic="median"), "abs_mean"),
        (dict(fisher_batches=0), "positive"),
    ],
)
def test_bad_method_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        SVDLLMModifier(**settings)


def test_svd_llm_v2_compresses_exactly_singular_statistics_without_fallback(tiny, calib, caplog):
    from loguru import logger

    messages = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    with torch.no_grad():  # an input channel of the MLP that is always zero
        tiny.model.layers[0].post_attention_layernorm.weight[3] = 0.0
    try:
        run_oneshot(tiny, calib, SVDLLMModifier(ratio=0.4, method="svd_llm_v2"))
    finally:
        logger.remove(sink)
    assert not any("not positive definite" in m for m in messages)
    gate = tiny.model.layers[0].mlp.gate_proj
    assert torch.isfinite(gate.svd_v.weight).all() and gate.rank > 0


def test_fisher_rows_do_not_depend_on_the_calibration_shuffle(tiny_dir, calib):
    """llmcompressor shuffles calibration samples with the global RNG; the Fisher pass reads the
    first ``fisher_batches`` samples in dataset order, so two processes get the same row weights."""
    scales = []
    for seed in (0, 1):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        torch.manual_seed(seed)  # what the unseeded RandomSampler draws from
        modifier = SVDLLMModifier(ratio=0.4, row_weighting="fisher", fisher_batches=2)
        run_oneshot(model, calib, modifier)
        scales.append(modifier._row_scale)
    assert scales[0].keys() == scales[1].keys() and scales[0]
    for name, r in scales[0].items():
        torch.testing.assert_close(r, scales[1][name], rtol=1e-9, atol=0)
