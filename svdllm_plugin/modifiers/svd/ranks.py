"""Ranks: the budget (``ratio``, ``model_ratio``, ``overrides``), its rounding to ``rank_multiple``,
and the non-uniform allocations chosen from the spectra (the ``ALLOCATIONS`` table).

Per-matrix rank arithmetic is in ``decompose.py``; the allocations' own algorithms are in
``allocation.py``; this module connects them to the modules of a model.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from loguru import logger
from torch import nn

from svdllm_plugin.layers import SVDLinear
from svdllm_plugin.modifiers.svd import passes
from svdllm_plugin.modifiers.svd.allocation import (
    Matrix,
    allocate_by_loss,
    allocate_by_sensitivity,
    allocate_global,
    allocate_v2,
)
from svdllm_plugin.modifiers.svd.decompose import (
    Factors,
    max_rank,
    params_of,
    rank_for_ratio,
    removed_fraction,
    rotate_factors,
    round_ranks,
    saves_parameters,
    truncation_loss,
)

__all__ = [
    "ALLOCATIONS",
    "LOSS_SPREAD",
    "achieved_ratio",
    "Spectra",
    "check_group_sizes",
    "ratio_for",
    "resolve_ratio",
    "sensitivity_search",
    "stored_rank",
    "uniform_ranks",
]

LOSS_SPREAD = 0.5  # `loss` / `global` allocation: each rank stays within (1 -/+ spread) x its uniform rank


# ---- the budget ---------------------------------------------------------------------------
def matches(name: str, pattern: str) -> bool:
    """An ``overrides`` pattern: ``re:`` regex, or the exact name or a dotted suffix of it."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def ratio_for(name: str, overrides: dict[str, float], default: float) -> float:
    """The ratio of one module: the first matching override, else ``default``."""
    for pattern, ratio in overrides.items():
        if matches(name, pattern):
            return ratio
    return default


def resolve_ratio(model: nn.Module, matched, ratio: float, model_ratio: float | None) -> float:
    """The per-matrix ratio; a whole-model budget is spread over the targeted matrices."""
    if model_ratio is None:
        return ratio
    whole = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    targeted = sum(lin.weight.numel() for _, lin in matched)
    ratio = model_ratio * whole / targeted
    if not 0.0 < ratio < 1.0:
        raise ValueError(
            f"model_ratio={model_ratio} would remove {ratio:.0%} of the targeted matrices "
            f"({targeted:,} of {whole:,} parameters); lower `model_ratio` or target more modules"
        )
    return ratio


# ---- rounding -----------------------------------------------------------------------------
def uniform_ranks(matched, ratios: dict[str, float], multiple: int, ratio: float) -> dict[str, int]:
    """The rank of every matched Linear that saves parameters at its ratio, rounded to ``multiple``
    under one budget (``round_ranks``); the others are logged and left out (they stay dense)."""
    shapes = [(lin.out_features, lin.in_features, ratios[name]) for name, lin in matched]
    ranks = {}
    for (name, _), (m, n, _), k in zip(matched, shapes, round_ranks(shapes, multiple)):
        if saves_parameters(m, n, k):
            ranks[name] = k
        else:
            logger.info("{} ({}x{}): rank {} saves nothing, kept dense", name, m, n, k)
    if not ranks:
        unrounded = [rank_for_ratio(m, n, r) for m, n, r in shapes]
        too_coarse = any(saves_parameters(m, n, k) for (m, n, _), k in zip(shapes, unrounded))
        raise ValueError(
            f"SVDLLMModifier: none of the {len(matched)} matched matrices saves parameters "
            f"at ratio={ratio}; "
            + (
                f"`rank_multiple: {multiple}` is larger than the ranks these matrices allow "
                f"(at most {max(unrounded)}); lower `rank_multiple`"
                if too_coarse
                else "raise `ratio`"
            )
        )
    return ranks


def achieved_ratio(matched, layers: dict[str, SVDLinear]) -> float:
    """Fraction of the targeted matrices' parameters the chosen ranks remove (dense ones count 0)."""
    return removed_fraction(
        [(lin.out_features, lin.in_features) for _, lin in matched],
        [layers[name].rank if name in layers else None for name, _ in matched],  # None: kept dense
    )


# ---- allocation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AllocationSpec:
    """A non-uniform allocation (one entry per ``allocation``).

    choose: (matrices, uniform ranks, ratio, rank_multiple, tokens, measure) -> {name: rank};
    ``measure`` runs the sensitivity search, only when called.
    capped: the factors are kept up to (1 + LOSS_SPREAD) x the uniform rank until the choice
    (else up to the largest rank that saves parameters).
    """

    choose: Callable[..., dict[str, int]]
    capped: bool


def _by_sensitivity(matrices, uniform, ratio, multiple, tokens, measure) -> dict[str, int]:
    target = sum(m.m * m.n - params_of(m.m, m.n, uniform[m.name]) for m in matrices)
    return allocate_by_sensitivity(matrices, measure(), target, multiple)


ALLOCATIONS: dict[str, AllocationSpec] = {
    "loss": AllocationSpec(
        lambda matrices, uniform, ratio, multiple, tokens, measure: allocate_by_loss(
            matrices, uniform, multiple, LOSS_SPREAD
        ),
        capped=True,
    ),
    "global": AllocationSpec(
        lambda matrices, uniform, ratio, multiple, tokens, measure: allocate_global(
            matrices, uniform, multiple, LOSS_SPREAD
        ),
        capped=True,
    ),
    "v2": AllocationSpec(
        lambda matrices, uniform, ratio, multiple, tokens, measure: allocate_v2(
            matrices, uniform, ratio, multiple, scale=tokens
        ),
        capped=False,
    ),
    "sensitivity": AllocationSpec(_by_sensitivity, capped=False),
}


def stored_rank(layer: SVDLinear, allocation: str) -> int:
    """The largest rank the allocation can give this layer (what is kept until it runs)."""
    largest = max_rank(layer.out_features, layer.in_features)  # still saves parameters
    if ALLOCATIONS[allocation].capped:
        return min(largest, max(layer.rank, int(layer.rank * (1 + LOSS_SPREAD))))
    return largest


@dataclass
class Spectra:
    """What a non-uniform allocation waits for until calibration ends: each matrix's full
    spectrum, its uniform rank, tokens and seconds (its factors, capped at the largest rank the
    allocation may choose, wait in the layer itself, offloaded with the model)."""

    sigma: dict[str, torch.Tensor] = field(default_factory=dict)  # (min(m, n),) each, on CPU
    uniform: dict[str, int] = field(default_factory=dict)  # ranks before allocation
    tokens: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # of the deferred factorizations

    def add(self, name: str, layer: SVDLinear, factors: Factors, tokens: int, seconds: float) -> None:
        self.uniform[name] = layer.rank
        layer.set_factors(factors.W_u, factors.W_v)
        self.sigma[name], self.tokens[name] = factors.sigma.cpu(), tokens
        self.seconds[name] = seconds

    def choose(self, allocation: str, layers, ratio: float, multiple: int, measure) -> dict[str, int]:
        """All ranks at once, from every matrix's full spectrum."""
        matrices = [
            Matrix(n, layers[n].out_features, layers[n].in_features, s) for n, s in self.sigma.items()
        ]
        uniform = {n: self.uniform[n] for n in self.sigma}
        start = time.perf_counter()
        ranks = ALLOCATIONS[allocation].choose(matrices, uniform, ratio, multiple, self.tokens, measure)
        logger.info(
            "{} allocation chose {} ranks in {:.1f}s", allocation, len(ranks), time.perf_counter() - start
        )
        return ranks

    def truncate(
        self, layers, chosen: dict[str, int], rotate: bool
    ) -> Iterator[tuple[str, SVDLinear, Factors]]:
        """Cut each layer's stored factors to its chosen rank, one layer at a time."""
        for name, sigma in self.sigma.items():
            layer = layers[name]
            k = min(chosen[name], layer.rank)
            W_u, W_v = layer.factors()
            factors = Factors(W_u[:, :k], W_v[:k], sigma, truncation_loss(sigma, k))
            if rotate:
                factors.W_u, factors.W_v = rotate_factors(factors.W_u, factors.W_v)
            layer.set_factors(factors.W_u, factors.W_v)
            yield name, layer, factors


def sensitivity_search(
    model: nn.Module, layers: dict[str, SVDLinear], names, calib, ratios, count: int, multiple: int
) -> tuple[dict[str, dict[float, float]], dict]:
    """ASVD: perplexity on calibration batches with only one matrix truncated at each ratio;
    (perplexities {name: {ratio: ppl}}, what the search cost); ``count`` calibration batches."""
    from tqdm import tqdm

    batches = passes.perplexity_batches(model, calib, count)
    start = time.perf_counter()
    base = passes.calibration_loss(model, batches)
    ppl: dict[str, dict[float, float]] = {}
    for name in tqdm(list(names), desc="Sensitivity"):
        layer = layers[name]
        W_u, W_v = layer.factors()  # stored at the largest rank: one layer in memory at a time
        ppl[name] = {}
        for ratio in ratios:
            k = min(rank_for_ratio(layer.out_features, layer.in_features, ratio, multiple), layer.rank)
            W_k = W_u[:, :k] @ W_v[:k]  # (m, n)
            with passes.replaced_output(layer, W_k):
                ppl[name][ratio] = passes.safe_exp(passes.calibration_loss(model, batches))
        del W_u, W_v
    seconds = time.perf_counter() - start
    cost = dict(
        seconds=seconds,
        evaluations=len(ppl) * len(ratios),
        batches=len(batches),
        base_ppl=passes.safe_exp(base),
    )
    logger.info(
        "Sensitivity search: {} evaluations x {} batches in {:.1f}s (dense calibration ppl {:.3f})",
        cost["evaluations"],
        len(batches),
        seconds,
        cost["base_ppl"],
    )
    return ppl, cost


def check_group_sizes(modifier, layers: dict[str, SVDLinear]) -> bool:
    """Whether a later modifier of the recipe quantizes the factors' ``svd_u`` weights; fails at
    initialize when its group size does not divide a rank.

    svd_u's input width is the rank k, and group quantization splits the input columns into
    whole groups: GPTQ would fail only after the SVD calibration has run.
    """
    from compressed_tensors.utils import match_targets
    from llmcompressor.core import active_session

    modifiers = list(getattr(active_session().lifecycle.recipe, "modifiers", None) or [])
    position = next((i for i, m in enumerate(modifiers) if m is modifier), None)
    if position is None:
        return False
    quantized = False
    for later in modifiers[position + 1 :]:
        if not hasattr(later, "resolve_quantization_config"):
            continue
        config = later.resolve_quantization_config()
        for scheme in config.config_groups.values():
            if scheme.weights is None:
                continue
            group_size = getattr(scheme.weights, "group_size", None) or 0
            for name, layer in layers.items():
                child = f"{name}.svd_u"
                if not match_targets(child, layer.svd_u, scheme.targets):
                    continue
                if match_targets(child, layer.svd_u, config.ignore):
                    continue
                quantized = True
                if group_size < 1 or layer.rank % group_size == 0:
                    continue
                raise ValueError(
                    f"{type(later).__name__} quantizes {child} in groups of {group_size} input columns, but "
                    f"its input width is the SVD rank {layer.rank}, not a multiple of {group_size}; set "
                    f"`rank_multiple: {group_size}` in SVDLLMModifier"
                )
    return quantized
