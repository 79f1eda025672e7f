"""The per-layer fit through oneshot: every method (METHODS) and update (UPDATES, ``update: output``)
on the tiny model, their budgets and their bad settings. The plain math is in test_decompose.py."""

from __future__ import annotations

import pytest
import torch
from support import run_oneshot

from svdllm_plugin import SVDLLMModifier
from svdllm_plugin.layers import factorized_ranks
from svdllm_plugin.modifiers.svd.decompose import factorize, output_objective, refit_u, whiten_cholesky
from svdllm_plugin.modifiers.svd.fit import Fit


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


# ---------------------------------------------------------------- update: output


def spy_on_fits(monkeypatch) -> list[dict]:
    """Records, per module, the output-matching objective of three fits from the statistics that
    the modifier's per-layer fit (``Fit.layer``) receives."""
    seen: list[dict] = []
    layer = Fit.layer

    def spy(fit, W, k, stats, original, *args):
        factors, objective = layer(fit, W, k, stats, original, *args)
        H, C, H_p = original.covariance(), stats.cross_covariance(), stats.covariance()
        truncated = factorize(W, k, whiten_cholesky(H))
        refit = refit_u(W, truncated.W_v, H_p)
        seen.append(
            dict(
                output=output_objective(W, factors.W_u, factors.W_v, H, C, H_p),
                truncation=output_objective(W, truncated.W_u, truncated.W_v, H, C, H_p),
                refit=output_objective(W, refit, truncated.W_v, H, C, H_p),
                dense=output_objective(
                    W, W, torch.eye(W.shape[1], dtype=W.dtype, device=W.device), H, C, H_p
                ),
            )
        )
        return factors, objective

    monkeypatch.setattr(Fit, "layer", spy)
    return seen


@pytest.mark.parametrize("update", ["output", "output_u"])
def test_update_output_on_a_tiny_model_is_never_worse(
    tiny_factory, tokenizer, calib, tmp_path, update, monkeypatch
):
    """On real paired activations of a 3-layer model (layers >= 1 see compressed inputs):
    the output-matching objective <= the W_u refit's and <= truncation alone's."""
    from transformers import AutoModelForCausalLM

    tiny_factory(hidden=64, layers=3).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    seen = spy_on_fits(monkeypatch)
    modifier = SVDLLMModifier(ratio=0.4, update=update)
    run_oneshot(model, calib, modifier)
    assert len(seen) == 21
    scale = max(s["truncation"] for s in seen)
    for s in seen:
        assert s["output"] <= s["refit"] + 1e-9 * scale
        assert s["output"] <= s["truncation"] + 1e-9 * scale
    later = seen[7:]  # layers 1, 2: X' differs from X
    gain = 0.95 if update == "output" else 1.0  # the W_u-only fit gains less than the full rank-k fit
    assert sum(s["output"] for s in later) < gain * sum(s["refit"] for s in later)
    assert all(r["objective"] >= 0 and "rel_objective" in r for r in modifier.records)


def test_update_option_and_its_legacy_spelling():
    assert SVDLLMModifier(closed_form_update=True).update == "input"
    out = SVDLLMModifier(update="output")
    assert out.closed_form_update and out.propagates
    again = SVDLLMModifier.model_validate(out.model_dump())
    assert again.update == "output"
    assert not SVDLLMModifier().propagates
    with pytest.raises(ValueError, match="whitening methods"):
        SVDLLMModifier(update="output", method="asvd")
    with pytest.raises(ValueError, match="activations: original"):
        SVDLLMModifier(update="output", activations="propagated")
    with pytest.raises(ValueError):
        SVDLLMModifier(update="outputs")


def test_update_output_holds_one_layer_at_most(tiny_factory, tokenizer, calib, tmp_path):
    """Between decoder layers nothing of a finished layer is held: no X X^T, no C, no stashed inputs;
    only vectors and the original stream's one copy of the next layer's input (by design)."""
    from support.factors import held_after_each_layer
    from transformers import AutoModelForCausalLM

    from svdllm_plugin.layers import SVDLinear

    tiny_factory(hidden=64, layers=3).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    held = held_after_each_layer(model, calib, SVDLLMModifier(ratio=0.4, update="output"))
    vectors = sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, SVDLinear))
    stream = len(calib) * len(calib[0]["input_ids"]) * model.config.hidden_size  # N T h
    assert len(held) == 4 and max(held) <= vectors + stream, held
