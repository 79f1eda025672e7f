"""The per-layer fit: from one Linear's calibration statistics to its factors (no modules, no hooks).

What each ``method`` reads and how it weights W is one row of ``METHODS``; what each ``update``
does after the truncation is one row of ``UPDATES``. ``Fit`` holds the options the fit reads,
resolved at initialize (``sigma`` and ``rotation`` depend on the rest of the recipe); its
``layer`` is the whole job for one matrix. The math itself is in ``decompose.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from svdllm_plugin.modifiers.svd.decompose import (
    Factors,
    factorize,
    output_match,
    output_objective,
    refit_u,
    rotate_factors,
    whiten_cholesky,
    whiten_eigh,
)
from svdllm_plugin.modifiers.svd.statistics import InputStatistics

__all__ = ["METHODS", "UPDATES", "MethodSpec", "UpdateSpec", "Fit", "row_scales"]


@dataclass(frozen=True)
class MethodSpec:
    """What a method reads and how it weights W before the SVD (one entry per method).

    statistics: what the forward-pre hooks accumulate ("H": X X^T, "abs": sum / max |x|).
    weighting: "whiten" (W S, S S^T = X X^T), "channel" (ASVD's W diag(s)), "none".
    rows: left weighting ("fisher": FWSVD's sqrt of Fisher row importance) or None.
    whitening: the whitening the method forces ("eigh" for V2) or None (the field decides).
    """

    statistics: frozenset
    weighting: Literal["whiten", "channel", "none"]
    rows: Literal["fisher"] | None = None
    whitening: Literal["cholesky", "eigh"] | None = None


METHODS: dict[str, MethodSpec] = {
    "svd": MethodSpec(frozenset(), "none"),
    "fwsvd": MethodSpec(frozenset(), "none", rows="fisher"),
    "asvd": MethodSpec(frozenset({"abs"}), "channel"),
    "svd_llm": MethodSpec(frozenset({"H"}), "whiten"),
    "svd_llm_v2": MethodSpec(frozenset({"H"}), "whiten", whitening="eigh"),
}

# right weightings S of W (S S^T = X X^T, ASVD's per-channel scale as a vector, or none)
WHITENINGS: dict[str, Callable] = {
    "cholesky": whiten_cholesky,
    "eigh": lambda H, name: whiten_eigh(H),
}
CHANNEL_STATISTICS: dict[str, Callable[[InputStatistics], torch.Tensor]] = {
    "abs_mean": lambda stats: stats.abs_sum / max(stats.tokens, 1),  # (n,)
    "abs_max": lambda stats: stats.abs_max,  # (n,)
}
WEIGHTINGS: dict[str, Callable] = {
    "none": lambda fit, stats, name: None,  # plain SVD; FWSVD weights rows, not inputs
    "channel": lambda fit, stats, name: (
        CHANNEL_STATISTICS[fit.asvd_statistic](stats).clamp_min(1e-6) ** fit.asvd_alpha  # (n,)
    ),
    "whiten": lambda fit, stats, name: fit.whiten(stats.covariance(), name),
}


# ---- updates: (fit, W, k, stats, original, row_scale, name, cache) -> Factors ----------------
def _truncate(fit: Fit, W, k, stats, original, row_scale, name, cache) -> Factors:
    """The method's weighted truncation (with the original model's statistics)."""
    return factorize(W, k, fit.weighting(original, name, cache), row_scale, fit.sigma)


def _refit_input(fit: Fit, W, k, stats, original, row_scale, name, cache) -> Factors:
    """SVD-LLM's update: W_u refit so that W_u W_v X' ~ W X' (``stats``: the propagated X')."""
    factors = _truncate(fit, W, k, stats, original, row_scale, name, cache)
    factors.W_u = refit_u(W, factors.W_v, stats.covariance(), damp=fit.damp)
    return factors


def _refit_output(fit: Fit, W, k, stats, original, row_scale, name, cache) -> Factors:
    """W_u W_v X' ~ W X (the original outputs) with the truncation's W_v."""
    factors = _truncate(fit, W, k, stats, original, row_scale, name, cache)
    factors.W_u = refit_u(W, factors.W_v, stats.covariance(), damp=fit.damp, C=stats.cross_covariance())
    return factors


def _match_output(fit: Fit, W, k, stats, original, row_scale, name, cache) -> Factors:
    """The rank-k W' minimising ||W X - W' X'||: whitens with the propagated H', not the method's S."""
    S_p = fit.whiten(stats.covariance(), "")
    return output_match(W, k, stats.cross_covariance(), stats.covariance(), S_p, fit.sigma, damp=fit.damp)


@dataclass(frozen=True)
class UpdateSpec:
    """A closed-form update after the truncation (one entry per ``update``).

    original: statistics of the ORIGINAL model's inputs are carried beside the propagated
    ones (the original stream); cross: C = X X'^T of paired original / propagated inputs;
    propagated: factors switch on at once so later layers see the compressed model;
    fit: the factors from the statistics.
    """

    original: bool
    cross: bool
    propagated: bool
    fit: Callable[..., Factors] = _truncate


UPDATES: dict[str, UpdateSpec] = {
    "none": UpdateSpec(original=False, cross=False, propagated=False),
    "input": UpdateSpec(True, cross=False, propagated=True, fit=_refit_input),  # W_u W_v X' ~ W X'
    "output": UpdateSpec(True, cross=True, propagated=True, fit=_match_output),  # W_u W_v X' ~ W X
    "output_u": UpdateSpec(True, cross=True, propagated=True, fit=_refit_output),  # same, W_v kept
}


def row_scales(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FWSVD's row weighting: sqrt of each matrix's Fisher row importance, floored relative to its max."""
    return {name: I.clamp_min(1e-12 * I.max().clamp_min(1e-30)).sqrt() for name, I in fisher.items()}


@dataclass(frozen=True)
class Fit:
    """How one Linear is fit: the options the fit reads, with ``sigma`` and ``rotate`` resolved."""

    method: str = "svd_llm"
    whitening: str = "cholesky"
    update: str = "none"
    sigma: str = "split"  # where Sigma goes: "split", "u" or "v"
    rotate: bool = False
    damp: float = 1e-6
    asvd_statistic: str = "abs_mean"
    asvd_alpha: float = 0.5

    @classmethod
    def resolve(cls, options, quantized: bool) -> Fit:
        """The fit that ``options`` (``SVDLLMOptions``) ask for; ``quantized``: a later modifier of
        the recipe quantizes svd_u (``auto`` then puts Sigma on W_v and rotates the factors)."""
        return cls(
            method=options.method,
            whitening=options.whitening,
            update=options.update,
            sigma=("v" if quantized else "split") if options.sigma == "auto" else options.sigma,
            rotate=quantized if options.rotation == "auto" else options.rotation == "random",
            damp=options.update_damp,
            asvd_statistic=options.asvd_statistic,
            asvd_alpha=options.asvd_alpha,
        )

    @property
    def statistics(self) -> frozenset:
        """Statistics the method reads (its table entry), plus X X^T for an update."""
        return METHODS[self.method].statistics | ({"H"} if self.update != "none" else frozenset())

    def whiten(self, H: torch.Tensor, name: str) -> torch.Tensor:
        return WHITENINGS[self.whitening](H, name)

    def weighting(self, stats: InputStatistics, name: str, cache: dict) -> torch.Tensor | None:
        """The right weighting S of the method (S S^T = X X^T, or ASVD's diagonal as a vector);
        cached per statistics object (shared inputs). Only the latest is kept: modules that share
        an input come one after another, and one n x n float64 S at a time is what memory allows."""
        key = id(stats)
        if key not in cache:
            cache.clear()
            cache[key] = WEIGHTINGS[METHODS[self.method].weighting](self, stats, name)
        return cache[key]

    def truncate(self, W, k: int, original, row_scale, name: str, cache: dict) -> Factors:
        """The weighted truncation alone (non-uniform allocations keep it at the largest rank)."""
        return _truncate(self, W, k, original, original, row_scale, name, cache)

    def layer(self, W, k: int, stats, original, row_scale, name: str, cache: dict) -> tuple[Factors, dict]:
        """Rank-k factors of W (m, n) and, for updates with cross statistics, their objective.

        ``stats``: this layer's input statistics on the calibration stream (propagated when an
        update is on); ``original``: the original model's (the same object without an update).
        """
        factors = UPDATES[self.update].fit(self, W, k, stats, original, row_scale, name, cache)
        if self.rotate:
            factors.W_u, factors.W_v = rotate_factors(factors.W_u, factors.W_v)
        if not UPDATES[self.update].cross:
            return factors, {}
        H, C, H_p = original.covariance(), stats.cross_covariance(), stats.covariance()
        objective = output_objective(W, factors.W_u, factors.W_v, H, C, H_p)
        relative = objective / max(float((W.double() @ H * W.double()).sum()), 1e-300)
        return factors, dict(objective=objective, rel_objective=relative)
