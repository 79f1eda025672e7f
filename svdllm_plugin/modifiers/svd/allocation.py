"""Rank allocation: how many singular values each matrix keeps under one parameter budget.

Plain functions over per-matrix spectra; the modifier supplies shapes and singular values.
- ``uniform``: the same ratio for every matrix, k = floor(m n (1 - r) / (m + n)).
- ``loss`` (SVD-LLM V2's idea): within each matrix type (q, k, v, o, gate, up, down) the
  type's rank budget is moved to the matrices whose truncation loses most. We hand out rank
  units greedily by the largest next sigma_i^2 relative to the matrix's energy sum sigma^2,
  which minimises the sum of relative truncation losses of the type exactly (each loss is
  convex and decreasing in k) while the type's total parameters stay those of ``uniform``.
- ``v2`` (SVD-LLM V2 as published, arXiv 2503.12340 section 3.1): within each type, with
  L_i the matrix's absolute whitened truncation loss at the uniform ratio R,
  R_i = N R (1 / log L_i) / sum_j (1 / log L_j) (N matrices in the type).
- ``global``: one budget over ALL targeted matrices, rank units handed out greedily by the
  absolute whitened loss they remove per parameter (sigma_{k+1}^2 / (m + n)), each matrix
  within (1 -/+ spread) x its uniform rank.
- ``sensitivity`` (ASVD): from measured perplexities per (matrix, candidate ratio), a
  binary search over a perplexity threshold meets a global parameter target.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass

import torch

from svdllm_plugin.modifiers.svd.decompose import (
    exact_rank,
    max_rank,
    params_of,
    round_ranks,
    truncation_loss,
)

__all__ = [
    "Matrix",
    "matrix_type",
    "allocate_by_loss",
    "allocate_v2",
    "allocate_global",
    "allocate_by_sensitivity",
    "params_of",
]


@dataclass
class Matrix:
    name: str
    m: int
    n: int
    sigma: torch.Tensor  # (min(m, n),) whitened singular values, descending

    @property
    def max_rank(self) -> int:
        """Largest rank that still saves parameters."""
        return max_rank(self.m, self.n)


def matrix_type(name: str) -> str:
    """The name with layer indices removed: 'model.layers.3.mlp.up_proj' -> 'model.layers.*.mlp.up_proj'."""
    return re.sub(r"\.\d+\.", ".*.", name)


def allocate_v2(
    matrices: list[Matrix],
    uniform: dict[str, int],
    ratio: float,
    multiple: int = 1,
    scale: dict | None = None,
) -> dict[str, int]:
    """SVD-LLM V2's published allocation: within each matrix type, R_i = N R (1/log L_i) / sum_j (1/log L_j).

    L_i: the absolute whitened truncation loss at the uniform rank, sum_{j > k} sigma_j^2, times
    ``scale[name]`` (the token count: the paper's X X^T is a sum over tokens; ours a mean).
    The formula needs every L_i > 1 (log L_i > 0); smaller losses are clamped to e (documented:
    the allocation is not scale-invariant). R_i is clamped to [0.05, 0.95] and the ranks are
    rounded under the type's budget.
    """
    ranks: dict[str, int] = {}
    groups: dict[str, list[Matrix]] = {}
    for mat in matrices:
        groups.setdefault(matrix_type(mat.name), []).append(mat)
    for group in groups.values():
        losses = [
            max(truncation_loss(m.sigma, uniform[m.name]) * (scale or {}).get(m.name, 1.0), math.e)
            for m in group
        ]
        inv = [1.0 / math.log(L) for L in losses]
        ratios = [min(0.95, max(0.05, len(group) * ratio * w / sum(inv))) for w in inv]
        chosen = round_ranks([(m.m, m.n, r) for m, r in zip(group, ratios)], multiple)
        ranks.update({m.name: min(k, m.max_rank) for m, k in zip(group, chosen)})
    return ranks


def allocate_global(
    matrices: list[Matrix], uniform: dict[str, int], multiple: int = 1, spread: float = 0.5
) -> dict[str, int]:
    """One parameter budget over all matrices (that of ``uniform``), filled greedily by the
    absolute whitened loss removed per parameter, each rank within (1 -/+ spread) x uniform."""
    budget = sum(params_of(m.m, m.n, uniform[m.name]) for m in matrices)
    floor = {
        m.name: max(multiple, int(uniform[m.name] * (1 - spread)) // multiple * multiple) for m in matrices
    }
    cap = {m.name: min(m.max_rank, int(uniform[m.name] * (1 + spread))) for m in matrices}
    ranks = dict(floor)
    budget -= sum(params_of(m.m, m.n, ranks[m.name]) for m in matrices)

    def gain(m: Matrix) -> float:
        k = ranks[m.name]
        return float((m.sigma[k : k + multiple].double() ** 2).sum()) / params_of(m.m, m.n, multiple)

    heap = [(-gain(m), i, m) for i, m in enumerate(matrices)]
    heapq.heapify(heap)
    while heap:
        _, i, mat = heapq.heappop(heap)
        step = params_of(mat.m, mat.n, multiple)
        if step > budget:
            continue
        ranks[mat.name] += multiple
        budget -= step
        if ranks[mat.name] + multiple <= cap[mat.name]:
            heapq.heappush(heap, (-gain(mat), i, mat))
    return ranks


def allocate_by_loss(
    matrices: list[Matrix], uniform: dict[str, int], multiple: int = 1, spread: float = 0.5
) -> dict[str, int]:
    """Greedy water-filling of each type's rank budget by relative truncation loss.

    Every matrix starts at (1 - spread) x its uniform rank and may grow to (1 + spread) x:
    unbounded, the greedy starves single matrices to rank 1, and an early layer cut that far
    ruins every layer after it (seen on SmolLM2).
    """
    ranks: dict[str, int] = {}
    groups: dict[str, list[Matrix]] = {}
    for mat in matrices:
        groups.setdefault(matrix_type(mat.name), []).append(mat)
    for group in groups.values():
        budget = sum(uniform[mat.name] for mat in group)  # same shape within a type: ranks are params
        floor = {
            m.name: max(multiple, int(uniform[m.name] * (1 - spread)) // multiple * multiple) for m in group
        }
        cap = {m.name: min(m.max_rank, int(uniform[m.name] * (1 + spread))) for m in group}
        current = dict(floor)
        budget -= sum(floor.values())
        heap = [(-_next_gain(m, current[m.name], multiple), i, m) for i, m in enumerate(group)]
        heapq.heapify(heap)
        while budget >= multiple and heap:
            _, i, mat = heapq.heappop(heap)
            current[mat.name] += multiple
            budget -= multiple
            if current[mat.name] + multiple <= cap[mat.name]:
                heapq.heappush(heap, (-_next_gain(mat, current[mat.name], multiple), i, mat))
        ranks.update(current)
    return ranks


def allocate_by_sensitivity(
    matrices: list[Matrix],
    ppl: dict[str, dict[float, float]],
    target_removed: int,
    multiple: int = 1,
) -> dict[str, int]:
    """ASVD: pick per-matrix ratios so that removed parameters reach ``target_removed``.

    For a perplexity threshold t every matrix takes the largest candidate ratio whose
    single-layer perplexity is <= t; a binary search over the sorted perplexities finds the
    smallest t that meets the target. The last rank steps are filled greedily by loss.
    """
    by_name = {mat.name: mat for mat in matrices}
    thresholds = sorted({p for per in ppl.values() for p in per.values()})

    def ranks_at(t: float) -> dict[str, int]:
        out = {}
        for name, per in ppl.items():
            mat = by_name[name]
            ok = [r for r, p in per.items() if p <= t]
            r = max(ok) if ok else 0.0
            k = mat.max_rank if r == 0.0 else int(exact_rank(mat.m, mat.n, r))
            out[name] = max(multiple, min(mat.max_rank, k // multiple * multiple))
        return out

    def removed(ranks: dict[str, int]) -> int:
        return sum(m.m * m.n - params_of(m.m, m.n, ranks[m.name]) for m in matrices)

    lo, hi = 0, len(thresholds) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if removed(ranks_at(thresholds[mid])) >= target_removed:
            hi = mid
        else:
            lo = mid + 1
    ranks = ranks_at(thresholds[lo])
    # overshoot: give rank back (largest relative loss first) until within one rank step
    excess = removed(ranks) - target_removed
    order = sorted(matrices, key=lambda m: -_next_gain(m, ranks[m.name], multiple))
    for mat in order:
        step = params_of(mat.m, mat.n, multiple)
        while excess >= step and ranks[mat.name] + multiple <= mat.max_rank:
            ranks[mat.name] += multiple
            excess -= step
    return ranks


def _next_gain(mat: Matrix, k: int, multiple: int) -> float:
    """Relative loss removed by keeping ``multiple`` more singular values after the first k."""
    energy = float((mat.sigma.double() ** 2).sum()) or 1.0
    return float((mat.sigma[k : k + multiple].double() ** 2).sum()) / energy
