"""Plain math of truncation-aware SVD compression (no modules, no hooks).

Notation follows ../ALGORITHMS.md: a Linear y = W x with W (m, n); calibration inputs
X (n, tokens); H = X X^T (n, n). A whitening S (n, n) with S S^T = H makes S^{-1} X
orthonormal, so for the SVD  W S = U Sigma V^T  and the rank-k truncation
W' = U_k Sigma_k V_k^T S^{-1} (= U_k U_k^T W, computed without any inverse):

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
    "exact_rank",
    "max_rank",
    "params_of",
    "round_ranks",
    "removed_fraction",
    "saves_parameters",
    "whiten_cholesky",
    "whiten_eigh",
    "factorize",
    "truncation_loss",
    "refit_u",
    "output_match",
    "output_objective",
    "rotate_factors",
]


@dataclass
class Factors:
    """W ~ W_u @ W_v, with the full singular spectrum of the (weighted) matrix."""

    W_u: torch.Tensor  # (m, k)
    W_v: torch.Tensor  # (k, n)
    sigma: torch.Tensor  # (min(m, n),) all singular values, descending
    loss: float  # sum of the discarded sigma_i^2 (the whitened truncation loss)


def exact_rank(m: int, n: int, ratio: float) -> float:
    """The real-valued rank that removes ``ratio`` of the m*n parameters: m n (1 - r) / (m + n)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1) (fraction of parameters removed); got {ratio}")
    return m * n * (1.0 - ratio) / (m + n)


def params_of(m: int, n: int, k: int) -> int:
    """Parameters of the factors W_u (m, k) and W_v (k, n)."""
    return k * (m + n)


def max_rank(m: int, n: int) -> int:
    """Largest rank that still saves parameters: k (m + n) < m n."""
    return max(1, (m * n - 1) // (m + n))


def rank_for_ratio(m: int, n: int, ratio: float, multiple: int = 1) -> int:
    """Rank k that removes ``ratio`` of one matrix's m*n parameters.

    ``multiple`` 1: floor(m n (1 - r) / (m + n)) (the paper's rank). A larger multiple rounds
    to the NEAREST multiple (never below ``multiple``): rounding down by up to a whole group
    (64) removed 33% of a 576 x 576 matrix asked for 20%. Capped at min(m, n). For many
    matrices under one budget use ``round_ranks``, which also rebalances the rounding.
    """
    k = exact_rank(m, n, ratio)
    if multiple == 1:
        return min(max(1, math.floor(k)), min(m, n))
    k = max(multiple, round(k / multiple) * multiple)
    return min(k, min(m, n))


def round_ranks(shapes: list[tuple[int, int, float]], multiple: int = 1) -> list[int]:
    """Ranks for (m, n, ratio) matrices under ONE budget, each a multiple of ``multiple``.

    Each rank is its exact rank rounded down or up to a multiple, and the choice is
    rebalanced so that the total parameter count is as close as one step allows to
    sum m n (1 - r): starting from all rounded down, the matrices with the largest rounding
    remainders are rounded up while that brings the total closer. ``multiple`` 1 is the
    paper's floor. A rank that saves nothing (see ``saves_parameters``) is left for the
    caller to keep dense.
    """
    if multiple == 1:
        return [rank_for_ratio(m, n, r) for m, n, r in shapes]
    exact = [exact_rank(m, n, r) for m, n, r in shapes]
    ranks = [
        min(max(multiple, math.floor(k / multiple) * multiple), min(m, n))
        for k, (m, n, _) in zip(exact, shapes)
    ]
    budget = sum(k * (m + n) for k, (m, n, _) in zip(exact, shapes)) - sum(
        params_of(m, n, k) for k, (m, n, _) in zip(ranks, shapes)
    )
    remainder = [(k - r) / multiple for k, r in zip(exact, ranks)]
    for i in sorted(range(len(shapes)), key=lambda i: -remainder[i]):
        m, n, _ = shapes[i]
        step = multiple * (m + n)
        up = ranks[i] + multiple
        if remainder[i] > 0 and budget >= step / 2 and up <= min(m, n) and saves_parameters(m, n, up):
            ranks[i] = up
            budget -= step
    return ranks


def removed_fraction(shapes: list[tuple[int, int]], ranks: list[int | None]) -> float:
    """Fraction of the matrices' parameters the factors remove (the achieved ratio).

    A rank of None is a matrix kept dense: its m n parameters stay, nothing is removed.
    """
    before = sum(m * n for m, n in shapes)
    after = sum(m * n if k is None else params_of(m, n, k) for (m, n), k in zip(shapes, ranks))
    return 1.0 - after / before if before else 0.0


def saves_parameters(m: int, n: int, k: int) -> bool:
    """A factorization pays only when k (m + n) < m n."""
    return k * (m + n) < m * n


def whiten_cholesky(H: torch.Tensor, name: str = "") -> torch.Tensor:
    """SVD-LLM whitening: the lower Cholesky factor S of H (S S^T = H), in float64.

    When H is not positive definite (a dead input channel, fewer tokens than channels) the
    diagonal is raised, as the reference code does, and the fallback is logged: first by
    eps = 1e-6 x mean(diag H) (enough when H is only singular: its negative eigenvalues are
    rounding), then by (-lambda_min + eps). If Cholesky still fails (ill-conditioned beyond
    float64), the eigendecomposition whitening of ``whiten_eigh`` is used, with a warning.
    No inverse of S is ever formed: ``factorize`` needs none.
    """
    H = H.to(torch.float64)
    S, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        return S
    label = name or "module"
    eps = 1e-6 * max(H.diagonal().abs().mean().item(), 1e-12)
    S, info = torch.linalg.cholesky_ex(_shifted(H, eps))
    if info.item() == 0:
        logger.warning(
            "{}: X X^T is not positive definite; adding {:.3e} I (whitening='eigh' needs no shift)",
            label,
            eps,
        )
        return S
    lambda_min = torch.linalg.eigvalsh(H)[0].item()
    shift = -lambda_min + eps if lambda_min <= 0 else eps
    logger.warning(
        "{}: X X^T is not positive definite (lambda_min={:.3e}); adding {:.3e} I "
        "(whitening='eigh' needs no shift)",
        label,
        lambda_min,
        shift,
    )
    S, info = torch.linalg.cholesky_ex(_shifted(H, shift))
    if info.item() == 0:
        return S
    logger.warning(
        "{}: Cholesky failed again after the shift (X X^T too ill-conditioned); using the "
        "eigendecomposition whitening (whitening='eigh') for this module",
        label,
    )
    return whiten_eigh(H)


def _shifted(H: torch.Tensor, shift: float) -> torch.Tensor:
    H = H.clone()
    H.diagonal().add_(shift)
    return H


def whiten_eigh(H: torch.Tensor) -> torch.Tensor:
    """SVD-LLM V2 whitening: H = Q Lambda Q^T, S = Q Lambda^{1/2} (S S^T = H), in float64.

    Negative eigenvalues (rounding on singular statistics) are clamped to 0: directions the
    data never visits get a zero column, so exactly singular statistics need no shift.
    """
    H = H.to(torch.float64)
    lam, Q = torch.linalg.eigh(H)  # ascending, (n,), (n, n)
    return Q * lam.clamp_min(0).sqrt()  # (n, n)


def factorize(
    W: torch.Tensor,
    k: int,
    S: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    sigma_on: str = "split",
) -> Factors:
    """Rank-k factors of W after weighting: SVD of diag(row_scale) W S, weights undone.

    S: right weighting, (n, n) (whitening, S S^T = H) or (n,) for a diagonal (ASVD's
    scales); None is identity. row_scale (m,): left weighting (FWSVD's sqrt of Fisher row
    importance); None is ones. sigma_on: "split" puts Sigma^{1/2} on both factors, "u" or
    "v" puts all of Sigma there. Computed in float64; returned in float64.

    No inverse of S: from A = diag(r) W S = U Sigma V^T, V_k^T S^{-1} = Sigma_k^{-1} U_k^T diag(r) W,
    so W_v = right_k V_k^T S^{-1} = (right_k / Sigma_k) U_k^T diag(r) W, with right_k the part
    of Sigma_k that goes to W_v (Sigma^{1/2}, 1 or Sigma).
    """
    if sigma_on not in ("split", "u", "v"):
        raise ValueError(f"sigma_on must be 'split', 'u' or 'v'; got {sigma_on!r}")
    W = W.to(torch.float64)  # (m, n)
    if row_scale is not None:
        row_scale = row_scale.to(W.device, torch.float64)  # Fisher sums live on CPU; W where onloaded
        W_r = row_scale[:, None] * W  # (m, n)
    else:
        W_r = W
    if S is None:
        A = W_r
    elif S.dim() == 1:
        A = W_r * S.to(torch.float64)  # W diag(s)
    else:
        A = W_r @ S.to(torch.float64)
    U, sigma, Vh = torch.linalg.svd(A, full_matrices=False)  # (m, r), (r,), (r, n)
    del A, Vh
    U_k, sigma_k = U[:, :k], sigma[:k]
    left = {"split": sigma_k.sqrt(), "u": sigma_k, "v": torch.ones_like(sigma_k)}[sigma_on]
    # right / sigma, with components of zero singular value dropped (they carry nothing)
    tiny = sigma[0].clamp_min(1e-300) * torch.finfo(torch.float64).eps if sigma.numel() else 0.0
    alive = sigma_k > tiny
    safe = torch.where(alive, sigma_k, torch.ones_like(sigma_k))
    right_over_sigma = {
        "split": safe.rsqrt(),
        "u": 1.0 / safe,
        "v": torch.ones_like(sigma_k),
    }[sigma_on] * alive
    W_u = U_k * left  # (m, k)
    W_v = right_over_sigma[:, None] * (U_k.T @ W_r)  # (k, n)
    if row_scale is not None:
        W_u = W_u / row_scale[:, None]
    return Factors(W_u=W_u, W_v=W_v, sigma=sigma, loss=truncation_loss(sigma, k))


def truncation_loss(sigma: torch.Tensor, k: int) -> float:
    """sum_{i > k} sigma_i^2: the output error that dropping the tail costs."""
    return float((sigma[k:].to(torch.float64) ** 2).sum())


def refit_u(
    W: torch.Tensor, W_v: torch.Tensor, H: torch.Tensor, damp: float = 1e-6, C: torch.Tensor | None = None
) -> torch.Tensor:
    """Closed-form W_u (m, k) for a fixed W_v (k, n), inputs X' with H = X' X'^T (n, n):

        C None (SVD-LLM's update):  min ||W X' - W_u W_v X'||_F^2 -> W_u = W H W_v^T (W_v H W_v^T)^{-1}
        C = X X'^T (output target): min ||W X  - W_u W_v X'||_F^2 -> W_u = W C W_v^T (W_v H W_v^T)^{-1}

    with X the original model's inputs on the same tokens. A relative ``damp`` on the
    diagonal keeps the k x k system solvable.
    """
    W, W_v, H = W.to(torch.float64), W_v.to(torch.float64), H.to(torch.float64)
    A = W_v @ H @ W_v.T  # (k, k)
    B = W @ (H if C is None else C.to(torch.float64)) @ W_v.T  # (m, k)
    A = A + damp * A.diagonal().mean().clamp_min(1e-30) * torch.eye(
        A.shape[0], dtype=A.dtype, device=A.device
    )
    return torch.linalg.solve(A, B.T).T  # (m, k); A is symmetric


def output_match(
    W: torch.Tensor,
    k: int,
    C: torch.Tensor,
    H_p: torch.Tensor,
    S_p: torch.Tensor,
    sigma_on: str = "split",
    damp: float = 1e-6,
) -> Factors:
    """Output-matching factors: the rank-k W' minimising ||W X - W' X'||_F^2, in closed form.

    X (n, tokens): the ORIGINAL model's inputs of this layer; X' (n, tokens): the compressed
    model's inputs on the same tokens. C = X X'^T (n, n), H_p = X' X'^T (n, n), S_p its
    whitening (S_p S_p^T = H_p). With B = W C H_p^{-1} (the unconstrained least-squares map;
    a solve, no inverse):

        ||W X - W' X'||^2 = ||W X - B X'||^2 + ||(B - W') S_p||^2,

    so the best rank k is the whitened truncation of B: ``factorize(B, k, S_p)``. It is never
    worse on this objective than any other rank-k factors (truncation alone, W_u refit). A
    relative ``damp`` on H_p's diagonal keeps the solve defined on singular statistics.
    """
    W, C, H_p = W.to(torch.float64), C.to(torch.float64), H_p.to(torch.float64)
    H_d = H_p + damp * H_p.diagonal().mean().clamp_min(1e-30) * torch.eye(
        H_p.shape[0], dtype=H_p.dtype, device=H_p.device
    )
    B = torch.linalg.solve(H_d, (W @ C).T).T  # (m, n); H_p symmetric: B H_p = W C
    return factorize(B, k, S_p, sigma_on=sigma_on)


def output_objective(
    W: torch.Tensor, W_u: torch.Tensor, W_v: torch.Tensor, H: torch.Tensor, C: torch.Tensor, H_p: torch.Tensor
) -> float:
    """||W X - W_u W_v X'||_F^2 from statistics: H = X X^T, C = X X'^T, H_p = X' X'^T.

    = tr(W H W^T) - 2 tr(W C W'^T) + tr(W' H_p W'^T), with W' = W_u W_v, computed through
    the (m, k) and (k, n) factors (never the (m, n) product twice).
    """
    W, W_u, W_v = W.to(torch.float64), W_u.to(torch.float64), W_v.to(torch.float64)
    H, C, H_p = H.to(torch.float64), C.to(torch.float64), H_p.to(torch.float64)
    dense = (W @ H * W).sum()
    cross = ((W @ C @ W_v.T) * W_u).sum()  # tr(W C W_v^T W_u^T)
    VHV = W_v @ H_p @ W_v.T  # (k, k)
    compressed = ((W_u @ VHV) * W_u).sum()
    return float(dense - 2 * cross + compressed)


def rotate_factors(W_u: torch.Tensor, W_v: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_u R^T, R W_v) for a seeded random orthogonal R (k, k): the same product, but the rank
    space is no longer the singular basis, so svd_u's input Hessian R Sigma^2 R^T is not
    diagonal (GPTQ can compensate rounding across columns) and a dominant direction is spread
    over all columns (incoherence, as in QuIP) instead of sitting in one.
    """
    k = W_v.shape[0]
    g = torch.Generator().manual_seed(seed)
    Q, Rr = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    R = Q * torch.sign(torch.diagonal(Rr))  # Haar-distributed orthogonal (k, k)
    R = R.to(W_v.device)
    return (W_u.to(torch.float64) @ R.T).to(W_u.dtype), (R @ W_v.to(torch.float64)).to(W_v.dtype)
