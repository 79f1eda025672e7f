"""The defining identity of truncation-aware whitening, on random W and correlated X."""

import pytest
import torch

from svdllm_plugin.modifiers.svd.decompose import (
    factorize,
    rank_for_ratio,
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
