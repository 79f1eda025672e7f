"""Plain math of truncation-aware SVD compression (no modules, no hooks).

Notation follows ../ALGORITHMS.md: a Linear y = W x with W (m, n); calibration inputs
X (n, tokens); H = X X^T (n, n). A whitening S (n, n) with S S^T = H makes S^{-1} X
orthonormal, so for the SVD  W S = U Sigma V^T  and the rank-k truncation
W' = U_k Sigma_k V_k^T S^{-1}:

    ||(W - W') X||_F^2 = sum_{i > k} sigma_i^2

i.e. dropping the smallest singular values is exactly loss-optimal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from loguru import logger

__all__ = [
    "Factors",
    "rank_for_ratio",
    "saves_parameters",
    "whiten_cholesky",
    "whiten_eigh",
    "factorize",
    "truncation_loss",
    "refit_u",
]


@dataclass
class Factors:
    """W ~ W_u @ W_v, with the full singular spectrum of the (weighted) matrix."""

    W_u: torch.Tensor  # (m, k)
    W_v: torch.Tensor  # (k, n)
    sigma: torch.Tensor  # (min(m, n),) all singular values, descending
    loss: float  # sum of the discarded sigma_i^2 (the whitened truncation loss)


def rank_for_ratio(m: int, n: int, ratio: float, multiple: int = 1) -> int:
    """Rank k that removes ``ratio`` of the m*n parameters: floor(m n (1 - r) / (m + n)).

    Rounded down to a multiple of ``multiple`` (never below ``multiple``), and capped at
    min(m, n).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1) (fraction of parameters removed); got {ratio}")
    k = math.floor(m * n * (1.0 - ratio) / (m + n))
    k = max(multiple, (k // multiple) * multiple)
    return min(k, min(m, n))


def saves_parameters(m: int, n: int, k: int) -> bool:
    """A factorization pays only when k (m + n) < m n."""
    return k * (m + n) < m * n


def whiten_cholesky(H: torch.Tensor, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM whitening: lower Cholesky factor S of H and its inverse, in float64.

    When H is not positive definite (a dead input channel, too few tokens) the diagonal
    is raised by (-lambda_min + eps) and the factorization retried, as the reference code
    does; the fallback is logged. Use ``whiten_eigh`` to avoid the shift altogether.
    """
    H = H.to(torch.float64)
    S, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        lambda_min = torch.linalg.eigvalsh(H)[0].item()
        eps = 1e-6 * max(H.diagonal().abs().mean().item(), 1e-12)
        shift = -lambda_min + eps if lambda_min <= 0 else eps
        logger.warning(
            "{}: X X^T is not positive definite (lambda_min={:.3e}); adding {:.3e} I "
            "(whitening='eigh' needs no shift)",
            name or "module",
            lambda_min,
            shift,
        )
        H = H + shift * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        S = torch.linalg.cholesky(H)
    eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    S_inv = torch.linalg.solve_triangular(S, eye, upper=False)
    return S, S_inv


def whiten_eigh(H: torch.Tensor, rtol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM V2 whitening: H = Q Lambda Q^T, S = Q Lambda^{1/2}, S^+ = Lambda^{-1/2} Q^T.

    Eigenvalues below ``rtol * lambda_max`` are directions the data never visits: their
    inverse is set to 0 (a pseudo-inverse), so exactly singular statistics need no shift.
    """
    H = H.to(torch.float64)
    lam, Q = torch.linalg.eigh(H)  # ascending, (n,), (n, n)
    keep = lam > rtol * lam[-1].clamp_min(torch.finfo(lam.dtype).tiny)
    root = lam.clamp_min(0).sqrt()
    inv_root = torch.where(keep, 1.0 / root.where(keep, torch.ones_like(root)), torch.zeros_like(root))
    S = Q * root  # (n, n)
    S_inv = inv_root[:, None] * Q.T  # (n, n)
    return S, S_inv


def factorize(
    W: torch.Tensor,
    k: int,
    S: torch.Tensor | None = None,
    S_inv: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    sigma_on: str = "split",
) -> Factors:
    """Rank-k factors of W after weighting: SVD of diag(row_scale) W S, weights undone.

    S / S_inv (n, n): right weighting (whitening, or ASVD's diag(s)); None is identity.
    row_scale (m,): left weighting (FWSVD's sqrt of Fisher row importance); None is ones.
    sigma_on: "split" puts Sigma^{1/2} on both factors, "u" or "v" puts all of Sigma there.
    Computed in float64; returned in float64.
    """
    W = W.to(torch.float64)  # (m, n)
    A = W if S is None else W @ S.to(torch.float64)
    if row_scale is not None:
        A = row_scale.to(torch.float64)[:, None] * A
    U, sigma, Vh = torch.linalg.svd(A, full_matrices=False)  # (m, r), (r,), (r, n)
    U_k, sigma_k, Vh_k = U[:, :k], sigma[:k], Vh[:k]
    if sigma_on == "split":
        left, right = sigma_k.sqrt(), sigma_k.sqrt()
    elif sigma_on == "u":
        left, right = sigma_k, torch.ones_like(sigma_k)
    elif sigma_on == "v":
        left, right = torch.ones_like(sigma_k), sigma_k
    else:
        raise ValueError(f"sigma_on must be 'split', 'u' or 'v'; got {sigma_on!r}")
    W_u = U_k * left  # (m, k)
    W_v = right[:, None] * Vh_k  # (k, n)
    if row_scale is not None:
        W_u = W_u / row_scale.to(torch.float64)[:, None]
    if S_inv is not None:
        W_v = W_v @ S_inv.to(torch.float64)
    return Factors(W_u=W_u, W_v=W_v, sigma=sigma, loss=truncation_loss(sigma, k))


def truncation_loss(sigma: torch.Tensor, k: int) -> float:
    """sum_{i > k} sigma_i^2: the output error that dropping the tail costs."""
    return float((sigma[k:].to(torch.float64) ** 2).sum())


def refit_u(W: torch.Tensor, W_v: torch.Tensor, H: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """SVD-LLM's closed-form update: with W_v (k, n) fixed, the W_u (m, k) minimising
    ||W X - W_u W_v X||_F^2 for inputs with H = X X^T (n, n):

        W_u = W H W_v^T (W_v H W_v^T)^{-1}

    A relative ``damp`` on the diagonal keeps the k x k system solvable.
    """
    W, W_v, H = W.to(torch.float64), W_v.to(torch.float64), H.to(torch.float64)
    A = W_v @ H @ W_v.T  # (k, k)
    B = W @ H @ W_v.T  # (m, k)
    A = A + damp * A.diagonal().mean().clamp_min(1e-30) * torch.eye(
        A.shape[0], dtype=A.dtype, device=A.device
    )
    return torch.linalg.solve(A, B.T).T  # (m, k); A is symmetric
