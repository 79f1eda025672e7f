"""Output-matching closed-form update (``update: output``) and the `update` option."""

from __future__ import annotations

import pytest
import torch
from support import run_oneshot

from svdllm_plugin.modifiers.svd import SVDLLMModifier
from svdllm_plugin.modifiers.svd.decompose import (
    factorize,
    output_match,
    output_objective,
    refit_u,
    whiten_cholesky,
)
from svdllm_plugin.modifiers.svd.fit import Fit


def paired_inputs(n=24, tokens=400, seed=0):
    """Original inputs X with outlier channels, and X' = X distorted (what a compressed
    earlier layer feeds): a linear mix plus noise."""
    g = torch.Generator().manual_seed(seed)
    X = (
        torch.randn(n, tokens, generator=g, dtype=torch.float64)
        * torch.linspace(0.1, 5, n, dtype=torch.float64)[:, None]
    )
    mix = torch.eye(n, dtype=torch.float64) + 0.2 * torch.randn(n, n, generator=g, dtype=torch.float64)
    X_p = mix @ X + 0.3 * torch.randn(n, tokens, generator=g, dtype=torch.float64)
    return X, X_p


def objective(W, W_u, W_v, X, X_p) -> float:
    return float((W @ X - W_u @ W_v @ X_p).pow(2).sum())


def test_output_objective_from_statistics_is_exact():
    X, X_p = paired_inputs()
    W = torch.randn(16, 24, dtype=torch.float64)
    f = factorize(W, 6, whiten_cholesky(X @ X.T))
    from_stats = output_objective(W, f.W_u, f.W_v, X @ X.T, X @ X_p.T, X_p @ X_p.T)
    assert from_stats == pytest.approx(objective(W, f.W_u, f.W_v, X, X_p), rel=1e-9)


@pytest.mark.parametrize("sigma_on", ["split", "u", "v"])
def test_output_match_beats_truncation_and_refit_on_the_original_outputs(sigma_on):
    X, X_p = paired_inputs(seed=1)
    W = torch.randn(16, 24, dtype=torch.float64)
    k = 6
    H, C, H_p = X @ X.T, X @ X_p.T, X_p @ X_p.T
    truncated = factorize(W, k, whiten_cholesky(H))  # plain SVD-LLM: original statistics
    refit = refit_u(W, truncated.W_v, H_p, damp=0.0)  # SVD-LLM's update: W_u W_v X' ~ W X'
    out = output_match(W, k, C, H_p, whiten_cholesky(H_p), sigma_on, damp=0.0)
    assert out.W_u.shape == (16, k) and out.W_v.shape == (k, 24)
    e_out = objective(W, out.W_u, out.W_v, X, X_p)
    e_trunc = objective(W, truncated.W_u, truncated.W_v, X, X_p)
    e_refit = objective(W, refit, truncated.W_v, X, X_p)
    # the refit matches W X', not W X: it can even be worse than truncation alone here
    assert e_out < e_refit and e_out < e_trunc
    assert e_out < 0.9 * e_trunc  # a real gain on this distortion, not a tie
    g = torch.Generator().manual_seed(2)  # a local minimum: perturbing either factor only hurts
    for W_u, W_v in [
        (out.W_u + 1e-4 * torch.randn(out.W_u.shape, generator=g, dtype=torch.float64), out.W_v),
        (out.W_u, out.W_v + 1e-4 * torch.randn(out.W_v.shape, generator=g, dtype=torch.float64)),
    ]:
        assert e_out <= objective(W, W_u, W_v, X, X_p)


def test_output_target_refit_of_w_u_beats_truncation_and_the_input_refit():
    X, X_p = paired_inputs(seed=5)
    W = torch.randn(16, 24, dtype=torch.float64)
    truncated = factorize(W, 6, whiten_cholesky(X @ X.T))
    W_in = refit_u(W, truncated.W_v, X_p @ X_p.T, damp=0.0)
    W_out = refit_u(W, truncated.W_v, X_p @ X_p.T, damp=0.0, C=X @ X_p.T)
    e_out = objective(W, W_out, truncated.W_v, X, X_p)
    assert e_out < objective(W, W_in, truncated.W_v, X, X_p)
    assert e_out < objective(W, truncated.W_u, truncated.W_v, X, X_p)
    full = output_match(W, 6, X @ X_p.T, X_p @ X_p.T, whiten_cholesky(X_p @ X_p.T), damp=0.0)
    assert objective(W, full.W_u, full.W_v, X, X_p) <= e_out  # the full rank-k optimum is lower still


def test_output_match_at_full_rank_is_the_least_squares_map():
    X, X_p = paired_inputs(seed=3)
    W = torch.randn(8, 24, dtype=torch.float64)
    out = output_match(W, 8, X @ X_p.T, X_p @ X_p.T, whiten_cholesky(X_p @ X_p.T), damp=0.0)
    B = torch.linalg.lstsq(X_p.T, (W @ X).T).solution.T  # min ||W X - B X'||
    torch.testing.assert_close(out.W_u @ out.W_v, B)


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
