"""The plain math of decompose.py on random W and correlated X: the defining identity of
truncation-aware whitening, the loss ordering of the methods, refits and the output-matching update."""

from __future__ import annotations

import pytest
import torch

from svdllm_plugin.modifiers.svd.decompose import (
    factorize,
    output_match,
    output_objective,
    rank_for_ratio,
    refit_u,
    saves_parameters,
    whiten_cholesky,
    whiten_eigh,
)


def correlated_inputs(n=48, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    return mix @ torch.randn(n, tokens, generator=g, dtype=torch.float64)  # (n, tokens)


@pytest.mark.parametrize("whiten", [whiten_cholesky, whiten_eigh])
@pytest.mark.parametrize("k", [1, 7, 20])
def test_loss_equals_discarded_singular_values(whiten, k):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 48, generator=g, dtype=torch.float64)  # (m, n)
    X = correlated_inputs()
    S = whiten(X @ X.T)
    f = factorize(W, k, S)
    loss = ((W - f.W_u @ f.W_v) @ X).pow(2).sum().item()
    expected = (torch.linalg.svdvals(W @ S)[k:] ** 2).sum().item()
    assert f.W_u.shape == (32, k) and f.W_v.shape == (k, 48)
    assert abs(loss - expected) / expected < 1e-6
    assert abs(f.loss - expected) / expected < 1e-6


def test_whitened_truncation_beats_plain_svd():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(32, 48, generator=g, dtype=torch.float64)
    X = correlated_inputs()
    S = whiten_cholesky(X @ X.T)
    whitened, plain = factorize(W, 10, S), factorize(W, 10)
    loss = lambda f: ((W - f.W_u @ f.W_v) @ X).pow(2).sum().item()  # noqa: E731
    assert loss(whitened) < loss(plain)


def test_eigh_handles_exactly_singular_statistics():
    X = correlated_inputs()
    X[5] = 0.0  # an input channel that is always zero
    H = X @ X.T
    assert torch.linalg.cholesky_ex(H).info.item() != 0
    W = torch.randn(32, 48, dtype=torch.float64)
    S = whiten_eigh(H)
    f = factorize(W, 10, S)
    loss = ((W - f.W_u @ f.W_v) @ X).pow(2).sum().item()
    assert abs(loss - f.loss) / f.loss < 1e-6
    assert torch.isfinite(f.W_v).all()


def test_cholesky_falls_back_on_singular_statistics():
    X = correlated_inputs()
    X[5] = 0.0
    S = whiten_cholesky(X @ X.T, "dead-channel")
    assert torch.isfinite(S).all()


@pytest.mark.parametrize("sigma_on", ["split", "u", "v"])
def test_sigma_placement_keeps_the_product(sigma_on):
    W = torch.randn(16, 24, dtype=torch.float64)
    ref = factorize(W, 8)
    f = factorize(W, 8, sigma_on=sigma_on)
    torch.testing.assert_close(f.W_u @ f.W_v, ref.W_u @ ref.W_v)


@pytest.mark.parametrize(
    "m, n, ratio, multiple, k",
    [
        (576, 576, 0.2, 1, 230),
        (1536, 576, 0.2, 1, 335),
        (576, 576, 0.2, 8, 232),  # nearest multiple: 230.4 -> 232
        (576, 576, 0.2, 64, 256),  # 230.4 -> 256 (rounding down gave 192: 33% removed)
        (4, 4, 0.9, 1, 1),
    ],
)
def test_rank_for_ratio(m, n, ratio, multiple, k):
    assert rank_for_ratio(m, n, ratio, multiple) == k


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_rank_for_ratio_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio must be in"):
        rank_for_ratio(8, 8, ratio)


def test_saves_parameters():
    assert saves_parameters(576, 576, 230) and not saves_parameters(576, 576, 288)


def outlier_inputs(n=48, tokens=600, seed=0):
    """Correlated inputs with a few large channels, as in LLM activations."""
    X = correlated_inputs(n, tokens, seed)
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
