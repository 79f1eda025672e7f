"""Plain math of low-rank compensation of quantization error (no modules, no hooks).

A Linear W (m, n) quantized to Q (m, n) leaves the error E = W - Q. With calibration inputs
X (n, tokens), H = X X^T = S S^T, the rank-r L (m, r), R (r, n) minimising

    ||(E - L R) X||_F^2

is SVD-LLM's truncation-aware whitening applied to E (QERA's exact solution): SVD of
E S = U Sigma V^T, L = U_r Sigma_r^{1/2}, R = Sigma_r^{-1/2} U_r^T E, and the objective left is
sum_{i > r} sigma_i^2 (``decompose.factorize`` computes all of it, without an inverse of S).

Ranks under a budget of extra bits per weight are allocated greedily on that identity: each
step of ``multiple`` ranks buys the largest drop of whitened loss per stored bit.
Quantized factors (``factor_bits``): R is rounded first (symmetric RTN, per group of input
columns), L is refit in closed form to the rounded R (``decompose.refit_u``), then rounded.
"""

from __future__ import annotations

import torch

from svdllm_plugin.modifiers.svd.decompose import Factors, factorize, refit_u

__all__ = [
    "fit_error",
    "objective",
    "factor_bits_of",
    "largest_rank",
    "allocate_ranks",
    "truncate",
    "quantize_symmetric",
    "group_for",
    "quantize_factors",
]


def fit_error(E: torch.Tensor, S: torch.Tensor, k: int) -> Factors:
    """Rank-k L (m, k) = ``W_u``, R (k, n) = ``W_v`` of the whitened truncation of E (m, n).

    ``sigma`` holds the full spectrum of E S, so any rank below k is a truncation of these
    factors (``truncate``) with loss sum_{i > r} sigma_i^2.
    """
    return factorize(E, k, S, sigma_on="split")


def objective(E: torch.Tensor, H: torch.Tensor, L: torch.Tensor | None = None, R: torch.Tensor | None = None):
    """||(E - L R) X||_F^2 = tr(D H D^T), D = E - L R (E alone when L, R are None), from H = X X^T."""
    D = E.to(torch.float64)  # (m, n)
    if L is not None:
        D = D - L.to(torch.float64) @ R.to(torch.float64)
    return float(((D @ H.to(torch.float64)) * D).sum())


def factor_bits_of(
    m: int, n: int, r: int, factor_bits: int | None, group_size: int, dtype_bits: int = 16
) -> float:
    """Stored bits of rank-r factors L (m, r), R (r, n): float entries, or integers plus scales
    (R: one per ``group_for(n, group_size)`` columns of each row; L: one per row)."""
    if r == 0:
        return 0.0
    if factor_bits is None:
        return float(r * (m + n) * dtype_bits)
    scales = r * (n // group_for(n, group_size)) + m
    return float(r * (m + n) * factor_bits + scales * dtype_bits)


def truncate(factors: Factors, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L (m, r), R (r, n)): the first r components of split-sigma factors."""
    return factors.W_u[:, :r], factors.W_v[:r]


def largest_rank(m: int, n: int, budget_bits: float, bits_of) -> int:
    """The largest r <= min(m, n) with ``bits_of(m, n, r)`` within ``budget_bits``."""
    r = 0
    while r < min(m, n) and bits_of(m, n, r + 1) <= budget_bits:
        r += 1
    return r


def allocate_ranks(
    spectra: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    budget_bits: float,
    bits_of,
    multiple: int,
    caps: dict[str, int],
) -> dict[str, int]:
    """Ranks (multiples of ``multiple``) whose factors fit ``budget_bits``, greedily on loss.

    ``bits_of(m, n, r)``: stored bits of rank-r factors. Each step gives ``multiple`` more
    components to the matrix whose next components drop its whitened residual sum sigma_i^2
    the most per stored bit, among the steps that still fit the budget and stay within
    ``caps``. Never over budget.
    """
    ranks = {name: 0 for name in spectra}
    energy = {name: (sigma.to(torch.float64) ** 2) for name, sigma in spectra.items()}
    left = float(budget_bits)
    while True:
        best, best_gain = None, 0.0
        for name, e in energy.items():
            m, n = shapes[name]
            r = ranks[name]
            cost = bits_of(m, n, r + multiple) - bits_of(m, n, r)
            if r + multiple > caps[name] or cost > left:
                continue
            gain = float(e[r : r + multiple].sum()) / cost
            if gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            return ranks
        m, n = shapes[best]
        left -= bits_of(m, n, ranks[best] + multiple) - bits_of(m, n, ranks[best])
        ranks[best] += multiple


def quantize_symmetric(W: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype):
    """Round-to-nearest symmetric integers per row group of ``group_size`` columns.

    Returns (dequantized W (m, n) float64, scale (m, n // group_size) in ``scale_dtype``); the
    scale is rounded to its stored dtype BEFORE rounding W, so packing the returned weight with
    this scale reproduces it exactly. ``group_size`` must divide n (the caller falls back to one
    group per row).
    """
    m, n = W.shape
    W = W.to(torch.float64)
    groups = W.reshape(m, n // group_size, group_size)  # (m, g, group)
    q_max = 2 ** (bits - 1) - 1
    scale = (groups.abs().amax(-1) / q_max).clamp_min(1e-12).to(scale_dtype)  # (m, g)
    s = scale.to(torch.float64)[..., None]
    q = torch.round(groups / s).clamp(-q_max - 1, q_max)
    return (q * s).reshape(m, n), scale


def group_for(n: int, group_size: int) -> int:
    """``group_size`` when it divides n, else one group per row (n)."""
    return group_size if n % group_size == 0 else n


def quantize_factors(
    E: torch.Tensor,
    H: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype,
):
    """Round R (groups of ``group_size`` columns), refit L to the rounded R on ||(E - L R_q) X||,
    round L (one scale per row: its rows are only r long).

    Returns (L_q (m, r), scale_L, R_q (r, n), scale_R), dequantized values in float64.
    """
    R_q, scale_R = quantize_symmetric(R, bits, group_for(R.shape[1], group_size), scale_dtype)
    L = refit_u(E, R_q, H)  # (m, r): the best L for the rounded R
    L_q, scale_L = quantize_symmetric(L, bits, L.shape[1], scale_dtype)
    return L_q, scale_L, R_q, scale_R
