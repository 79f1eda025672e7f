"""LowRankCompensationModifier: fit a low-rank term to each Linear's quantization error.

Place it AFTER a quantization modifier (GPTQModifier, QuantizationModifier) in the same stage:

    GPTQModifier: {...}
    LowRankCompensationModifier: {targets: ["Linear"], ignore: ["re:.*lm_head"], extra_bits: 0.5}

Lifecycle (llmcompressor calls these, modifiers in recipe order):
- on_initialize: the targeted Linears must already carry a quantization scheme (the quantization
  modifier before this one attached it), or the recipe is refused.
- on_calibration_start: forward-pre hooks snapshot each Linear's ORIGINAL weight W (CPU,
  float32, on its first calibration batch) and accumulate H = X X^T per distinct input.
- on_sequential_epoch_end: the quantization modifier has just written Q(W) into the decoder
  layer's Linears; E = W - Q(W) is fitted by the whitened truncation (fit.py), ranks are
  allocated within the layer under the budget, and each Linear becomes a CompensatedLinear
  y = Q(W) x + L (R x). The pipeline then propagates the compensated layer's outputs to the
  next layer. Memory: the snapshots and statistics of one decoder layer.
- on_calibration_end: anything left (Linears outside decoder layers), then the hooks go.
"""

from __future__ import annotations

import time

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn

from svdllm_plugin import distributed
from svdllm_plugin.layers import CompensatedLinear, replace_module
from svdllm_plugin.modifiers.compensation import fit, steps
from svdllm_plugin.modifiers.svd.decompose import Factors, whiten_cholesky, whiten_eigh
from svdllm_plugin.modifiers.svd.statistics import StatisticsCollector

__all__ = ["LowRankCompensationModifier"]

_FACTOR_NAMES = (".lowrank_l", ".lowrank_r")
_RULES = {  # field: (valid, what it must be)
    "rank": (lambda v: v is None or v >= 1, "a positive integer (the rank of L R per matrix)"),
    "extra_bits": (lambda v: v is None or v > 0, "positive (extra bits per weight, e.g. 0.5)"),
    "factor_bits": (lambda v: v in (None, 4, 8), "null (float factors), 8 or 4"),
    "whitening": (lambda v: v in ("cholesky", "eigh"), "'cholesky' or 'eigh'"),
    **{
        field: (lambda v: v >= 1, "a positive integer")
        for field in ("rank_multiple", "factor_group_size", "rounds", "budget_dtype_bits")
    },
}


class LowRankCompensationModifier(Modifier):
    """Compensate quantization error with whitened low-rank factors: W ~ Q(W) + L R.

    :param targets: Linears to compensate (llmcompressor matching: class names, ``re:`` patterns).
    :param ignore: Linears left alone. Default: the (possibly tied) lm_head.
    :param rank: the same rank r for every matrix (capped at min(m, n); ``rank_multiple`` unused).
    :param extra_bits: budget instead of ``rank``: extra stored bits per weight of the targeted
        Linears, spent within each decoder layer on the components that drop the whitened
        residual ||(W - Q - L R) X|| the most per bit. Exactly one of ``rank`` / ``extra_bits``.
    :param rank_multiple: budget ranks are multiples of this.
    :param factor_bits: ``null``: factors stored in the model's dtype; 8 or 4: symmetric integer
        factors (round R, refit L, round L), packed by compressed-tensors at save.
    :param factor_group_size: columns per scale of quantized factors (one per row when it does
        not divide the row).
    :param rounds: alternating rounds: round t > 1 re-quantizes W - L R with GPTQ (the scales of
        the first quantization kept) and refits L R to the new error.
    :param whitening: ``cholesky`` (SVD-LLM) or ``eigh`` (no positive-definite requirement).
    :param budget_dtype_bits: bits of one unquantized factor entry (and of a scale) in the
        budget: 16 for a bf16 / fp16 save, 32 for fp32.
    """

    requires_calibration_data: bool = True

    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["re:.*lm_head"])
    rank: int | None = None
    extra_bits: float | None = None
    rank_multiple: int = 8
    factor_bits: int | None = None
    factor_group_size: int = 64
    rounds: int = 1
    whitening: str = "cholesky"
    budget_dtype_bits: int = 16

    _linears: dict[str, nn.Linear] = PrivateAttr(default_factory=dict)
    _names: dict[nn.Module, str] = PrivateAttr(default_factory=dict)
    _W: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)  # original weights, one layer
    _collector: StatisticsCollector | None = PrivateAttr(default=None)
    _records: list[dict] = PrivateAttr(default_factory=list)
    _done: set = PrivateAttr(default_factory=set)

    # ---- validation -----------------------------------------------------------------
    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _as_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator(*_RULES)
    @classmethod
    def _check(cls, value, info):
        valid, what = _RULES[info.field_name]
        if not valid(value):
            raise ValueError(f"`{info.field_name}` must be {what}; got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_size(self):
        if (self.rank is None) == (self.extra_bits is None):
            got = "both" if self.rank is not None else "neither"
            raise ValueError(
                f"set exactly one of `rank` (fixed rank per matrix) or `extra_bits` (budget in extra bits "
                f"per weight); got {got}"
            )
        return self

    # ---- lifecycle ------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        matched = [
            (name, module)
            for name, module in match_named_modules(state.model, self.targets, self.ignore)
            if isinstance(module, nn.Linear) and not name.endswith(_FACTOR_NAMES)
        ]
        if not matched:
            raise ValueError(
                f"LowRankCompensationModifier found no Linear modules matching targets={self.targets} "
                f"(ignore={self.ignore}). Please check `targets` in the recipe."
            )
        quantized = [(n, m) for n, m in matched if steps.weight_scheme(m) is not None]
        if not quantized:
            raise ValueError(
                f"LowRankCompensationModifier: none of the {len(matched)} matched Linears is quantized; "
                "place it AFTER a quantization modifier (e.g. GPTQModifier) in the same stage of the recipe"
            )
        if self.rounds > 1 and distributed.is_distributed():
            raise ValueError("`rounds` > 1 re-quantizes in every process; under torchrun use `rounds: 1`")
        skipped = len(matched) - len(quantized)
        if skipped:
            logger.info(
                "LowRankCompensationModifier: {} matched Linears are not quantized, left alone", skipped
            )
        self._linears = dict(quantized)
        self._names = {m: n for n, m in quantized}
        for module in self._linears.values():  # from now on: the quantizer may run its own pass first
            self.register_hook(module, self._observe, "forward_pre")
        logger.info(
            "LowRankCompensationModifier: {} Linears, {}, factor_bits={}, rounds={}",
            len(quantized),
            f"rank={self.rank}" if self.rank else f"extra_bits={self.extra_bits}",
            self.factor_bits,
            self.rounds,
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        self._collector = StatisticsCollector(names=self._names, want=frozenset({"H"}))
        if self._W:  # oneshot's default `independent` pipeline: the quantizer had a pass of its own
            megabytes = sum(W.numel() * 4 for W in self._W.values()) / 2**20
            logger.warning(
                "LowRankCompensationModifier: the quantizer calibrated in a pass of its own, so the "
                "original weights of {} Linears ({:.0f} MB) were held on the CPU; run "
                "oneshot(..., pipeline='sequential') to hold one decoder layer at a time",
                len(self._W),
                megabytes,
            )

    def _observe(self, module: nn.Module, args: tuple) -> None:
        """Snapshot W on the module's first calibration batch (before the quantizer writes Q(W));
        accumulate X X^T during this modifier's calibration."""
        name = self._names[module]
        if name not in self._W and name not in self._done:
            self._W[name] = module.weight.detach().to("cpu", torch.float32).clone()
        if self._collector is not None:
            self._collector(module, args)

    def on_sequential_epoch_end(self, state: State, event: Event, modules=None, **kwargs):
        self._compensate_ready(state.model)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._compensate_ready(state.model)
        self.remove_hooks()
        missed = [n for n in self._linears if n not in self._done]
        if missed:
            raise RuntimeError(
                f"Failed to compensate {len(missed)} modules that saw no calibration data: {missed[:5]}... "
                "Check that they run in the model's forward."
            )
        self._collector, self._W = None, {}

    def on_finalize(self, state: State, **kwargs) -> bool:
        steps.log_summary(self._records)
        return True

    @property
    def records(self) -> list[dict]:
        """One dict per compensated module: name, rank, objectives before / after, bits, seconds."""
        return list(self._records)

    # ---- work -----------------------------------------------------------------------
    def _compensate_ready(self, model: nn.Module) -> None:
        """Compensate every Linear whose calibration ran (one decoder layer), then free its data."""
        collector = self._collector
        if collector is None:
            return
        ready = [
            n for n, m in self._linears.items() if n not in self._done and n in self._W and collector.get(m)
        ]
        if not ready:
            return
        start = time.perf_counter()
        shapes = {n: (self._linears[n].out_features, self._linears[n].in_features) for n in ready}
        cap = self._cap(ready, shapes)
        steps.sum_over_ranks({id(s): s for s in (collector.get(self._linears[n]) for n in ready)}.values())
        whitened: dict[int, torch.Tensor] = {}  # one whitening per shared input
        results = {n: self._fit(n, cap[n], whitened) for n in ready}
        ranks = self._ranks(ready, shapes, cap, {n: f.sigma for n, f in results.items()})
        for name in ready:
            self._apply(model, name, results[name], ranks[name], time.perf_counter() - start)
        collector.release(self._linears[n] for n in ready)
        for name in ready:
            self._W.pop(name, None)
            self._done.add(name)

    def _cap(self, ready: list[str], shapes: dict) -> dict[str, int]:
        """The largest rank each matrix may get: ``rank``, or what the whole layer's budget buys."""
        if self.rank is not None:
            return {n: min(self.rank, *shapes[n]) for n in ready}
        budget = self.extra_bits * sum(m * n for m, n in shapes.values())
        return {name: fit.largest_rank(m, n, budget, self._bits) for name, (m, n) in shapes.items()}

    def _bits(self, m: int, n: int, r: int) -> float:
        """Stored bits of rank-r factors of an (m, n) matrix, as this modifier saves them."""
        return fit.factor_bits_of(m, n, r, self.factor_bits, self.factor_group_size, self.budget_dtype_bits)

    def _error(self, name: str) -> torch.Tensor:
        """E = W - Q(W) (m, n) float64: the snapshot minus what the quantizer wrote."""
        module = self._linears[name]
        Q = module.weight.detach().to(torch.float64)
        return self._W[name].to(Q.device, torch.float64) - Q

    def _fit(self, name: str, k: int, whitened: dict) -> Factors:
        """Factors of E at rank k (the full spectrum kept)."""
        stats = self._collector.get(self._linears[name])
        key = id(stats)
        if key not in whitened:
            whitened[key] = self._whiten(stats.covariance(), name)
        return fit.fit_error(self._error(name), whitened[key], k)

    def _ranks(self, ready, shapes, cap, spectra) -> dict[str, int]:
        if self.rank is not None:
            return {n: cap[n] for n in ready}
        budget = self.extra_bits * sum(m * n for m, n in shapes.values())
        return fit.allocate_ranks(spectra, shapes, budget, self._bits, self.rank_multiple, cap)

    def _apply(self, model: nn.Module, name: str, factors: Factors, r: int, seconds: float) -> None:
        """Write Q(W) + L R into the model (every rank) and record the objectives."""
        linear = self._linears[name]
        H = self._collector.get(linear).covariance()
        E = self._error(name)
        objective_q = fit.objective(E, H)
        L, R = fit.truncate(factors, r)
        if r and self.rounds > 1:
            E, L, R = self._alternate(name, E, L, R, H)
        L, R = steps.same_on_all_ranks(L, R)
        scales = None
        if r and self.factor_bits is not None:  # deterministic from the (identical) L, R and H
            L, scale_L, R, scale_R = fit.quantize_factors(
                E, H, L, R, self.factor_bits, self.factor_group_size, linear.weight.dtype
            )
            scales = (scale_L, scale_R)
        objective = fit.objective(E, H, L, R) if r else fit.objective(E, H)
        if r and objective >= fit.objective(E, H):  # rounded factors that do not help: Q alone
            logger.info("{}: rank-{} factors do not lower the whitened error; kept uncompensated", name, r)
            r, objective = 0, fit.objective(E, H)
        if r:
            layer = CompensatedLinear.from_linear(linear, L, R)
            if scales is not None:
                steps.attach_factor_schemes(layer, self.factor_bits, self.factor_group_size, *scales)
            replace_module(model, name, layer)
        m, n = linear.out_features, linear.in_features
        record = dict(name=name, rank=r, m=m, n=n, objective_q=objective_q, objective=objective)
        self._records.append(dict(record, bits=self._bits(m, n, r)))
        steps.log_record(self._records[-1], seconds)

    def _alternate(self, name: str, E, L, R, H):
        """Rounds 2..``rounds`` (CALDERA): see ``steps.alternate``."""
        linear = self._linears[name]
        return steps.alternate(linear, self._W[name], E, L, R, H, self._whiten(H, name), self.rounds)

    def _whiten(self, H: torch.Tensor, name: str) -> torch.Tensor:
        return whiten_eigh(H) if self.whitening == "eigh" else whiten_cholesky(H, name)
