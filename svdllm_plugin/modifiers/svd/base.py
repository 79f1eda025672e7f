"""SVDLLMModifier: truncation-aware whitening SVD as an llm-compressor modifier.

Lifecycle (llmcompressor calls these):
- on_initialize: every targeted Linear becomes a *pending* SVDLinear whose factor
  shapes are final (ranks come from the ratio), so modifiers initialized after this one
  (GPTQ, pruning) bind to the factor Linears ``svd_u`` / ``svd_v``.
- on_calibration_start: forward-pre hooks accumulate X X^T per distinct input.
- on_sequential_epoch_end: the decoder layer just calibrated is decomposed. With
  ``activations="propagated"`` the factors are switched on at once, so later layers are
  calibrated on the compressed model's outputs; with ``"original"`` (the paper) the layers
  keep computing densely until calibration ends, so every layer sees original activations.
- on_calibration_end: non-uniform allocations (``loss``, ``sensitivity``) choose every
  rank now, from all spectra; then every layer switches to its factors.

Whole-model passes live in ``passes.py`` (FWSVD's Fisher, the closed-form update's original
statistics, ASVD's sensitivity); rank allocation in ``allocation.py``; math in ``decompose.py``.
"""

from __future__ import annotations

import re
import time
from typing import Literal

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn

from svdllm_plugin.layers import SVDLinear, replace_module
from svdllm_plugin.modifiers.svd import distributed, passes
from svdllm_plugin.modifiers.svd.allocation import Matrix, allocate_by_loss, allocate_by_sensitivity
from svdllm_plugin.modifiers.svd.decompose import (
    Factors,
    factorize,
    rank_for_ratio,
    refit_u,
    saves_parameters,
    truncation_loss,
    whiten_cholesky,
    whiten_eigh,
)
from svdllm_plugin.modifiers.svd.original import OriginalStream, decoder_layers
from svdllm_plugin.modifiers.svd.statistics import StatisticsCollector

__all__ = ["SVDLLMModifier"]

LOSS_SPREAD = 0.5  # `loss` allocation: each rank stays within (1 -/+ spread) x its uniform rank

Method = Literal["svd_llm", "svd_llm_v2", "svd", "asvd", "fwsvd"]


class SVDLLMModifier(Modifier):
    """Compress Linears into W_u (m, k) @ W_v (k, n) after whitening by calibration data.

    :param targets: modules to compress, llmcompressor matching style (class names or
        ``re:`` patterns on module names). Default: every Linear.
    :param ignore: modules never compressed. Default: the (possibly tied) lm_head.
    :param ratio: fraction of each targeted matrix's parameters REMOVED, in (0, 1);
        rank k = floor(m n (1 - ratio) / (m + n)). A matrix that would save nothing stays dense.
    :param overrides: per-module ratios, ``{pattern: ratio}``; the first pattern that
        matches a module name (``re:`` regex or exact suffix) wins.
    :param method: ``svd_llm`` (whitening by ``whitening``), ``svd_llm_v2``
        (eigendecomposition whitening: no positive-definite requirement), ``svd`` (plain,
        ignores data), ``asvd`` (activation-aware channel scaling).
    :param whitening: ``cholesky`` (SVD-LLM, with a logged diagonal shift when X X^T is not
        positive definite) or ``eigh`` (pseudo-inverse, works on singular statistics).
    :param rank_multiple: round ranks down to a multiple of this (e.g. 8; the GPTQ group
        size when the factors are quantized, since svd_u's input width is the rank).
    :param sigma: where Sigma goes: ``split`` (Sigma^1/2 on both), ``u`` or ``v``.
    :param activations: statistics from the ``original`` model's activations (the paper)
        or from the ``propagated`` outputs of already-compressed layers.
    :param asvd_alpha: ASVD exponent, scale s_j = stat_j ** alpha.
    :param asvd_statistic: ``abs_mean`` or ``abs_max`` of each input channel.
    :param model_ratio: alternative to ``ratio``: fraction of the WHOLE model's parameters
        to remove, spread over the targeted matrices.
    :param allocation: ``uniform`` (same ratio everywhere), ``loss`` (SVD-LLM V2:
        heterogeneous ranks from truncation loss within each matrix type) or
        ``sensitivity`` (ASVD's perplexity search to the same global budget).
    :param closed_form_update: SVD-LLM's layer-wise update: whiten with the original
        model's statistics, then refit W_u by least squares on the propagated inputs of the
        already-compressed layers (costs one extra forward pass for original statistics).
    :param fisher_batches: calibration batches for FWSVD's gradient pass.
    :param sensitivity_ratios: candidate ratios of the sensitivity search.
    :param sensitivity_batches: calibration batches per sensitivity measurement.
    """

    requires_calibration_data: bool = True

    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["re:.*lm_head"])
    ratio: float = 0.2
    overrides: dict[str, float] = Field(default_factory=dict)
    method: Method = "svd_llm"
    whitening: Literal["cholesky", "eigh"] = "cholesky"
    rank_multiple: int = 1
    sigma: Literal["split", "u", "v"] = "split"
    activations: Literal["original", "propagated"] = "original"
    asvd_alpha: float = 0.5
    asvd_statistic: Literal["abs_mean", "abs_max"] = "abs_mean"
    model_ratio: float | None = None
    allocation: Literal["uniform", "loss", "sensitivity"] = "uniform"
    closed_form_update: bool = False
    fisher_batches: int = 8
    sensitivity_ratios: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    sensitivity_batches: int = 2

    _layers: dict[str, SVDLinear] = PrivateAttr(default_factory=dict)
    _collector: StatisticsCollector | None = PrivateAttr(default=None)
    _records: list[dict] = PrivateAttr(default_factory=list)
    _kept_dense: list[str] = PrivateAttr(default_factory=list)
    _row_scale: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _original: StatisticsCollector | None = PrivateAttr(default=None)
    _stream: OriginalStream | None = PrivateAttr(default=None)
    _spectra: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)  # full sigma, non-uniform
    _uniform: dict[str, int] = PrivateAttr(default_factory=dict)  # ranks before allocation
    _ratio: float = PrivateAttr(default=0.2)
    _sensitivity_cost: dict = PrivateAttr(default_factory=dict)
    _seconds: dict[str, float] = PrivateAttr(default_factory=dict)  # deferred factorizations
    _tokens: dict[str, int] = PrivateAttr(default_factory=dict)

    # ---- validation -----------------------------------------------------------------
    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _as_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("ratio")
    @classmethod
    def _check_ratio(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(
                f"`ratio` is the fraction of each matrix's parameters removed and must be in "
                f"(0, 1), e.g. 0.2; got {value}"
            )
        return value

    @field_validator("model_ratio")
    @classmethod
    def _check_model_ratio(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(
                f"`model_ratio` is the fraction of the whole model removed, in (0, 1); got {value}"
            )
        return value

    @field_validator("sensitivity_ratios")
    @classmethod
    def _check_candidates(cls, value: list[float]) -> list[float]:
        if not value or not all(0.0 < r < 1.0 for r in value):
            raise ValueError(f"`sensitivity_ratios` must be ratios in (0, 1); got {value}")
        return sorted(value)

    @field_validator("fisher_batches", "sensitivity_batches")
    @classmethod
    def _check_batches(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"batch counts must be positive integers; got {value}")
        return value

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, value: dict[str, float]) -> dict[str, float]:
        for pattern, ratio in value.items():
            if not 0.0 < ratio < 1.0:
                raise ValueError(f"`overrides[{pattern!r}]` must be a ratio in (0, 1); got {ratio}")
        return value

    @field_validator("rank_multiple")
    @classmethod
    def _check_multiple(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"`rank_multiple` must be a positive integer; got {value}")
        return value

    @model_validator(mode="after")
    def _check_combination(self):
        if self.method == "svd_llm_v2":
            self.whitening = "eigh"
        if self.allocation != "uniform" and self.activations != "original":
            raise ValueError(
                f"allocation={self.allocation!r} chooses ranks from every layer's spectrum at the end "
                "of calibration; it needs `activations: original`"
            )
        if self.closed_form_update and (self.activations != "original" or self.allocation != "uniform"):
            raise ValueError(
                "`closed_form_update` whitens with the original statistics and refits on propagated "
                "inputs; it needs `activations: original` and `allocation: uniform`"
            )
        if self.closed_form_update and self.method not in ("svd_llm", "svd_llm_v2"):
            raise ValueError("`closed_form_update` applies to method svd_llm / svd_llm_v2")
        return self

    # ---- lifecycle ------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        matched = [
            (name, module)
            for name, module in match_named_modules(model, self.targets, self.ignore)
            if isinstance(module, nn.Linear) and not _inside_svd_linear(name)
        ]
        if not matched and any(isinstance(m, SVDLinear) for m in model.modules()):
            raise ValueError(
                "SVDLLMModifier: the model is already factorized (it has SVDLinear modules and no "
                "dense Linear left to compress); start from the dense model"
            )
        if not matched:
            raise ValueError(
                f"SVDLLMModifier found no Linear modules matching targets={self.targets} "
                f"(ignore={self.ignore}). Please check `targets` in the recipe."
            )
        self._ratio = self._resolve_ratio(model, matched)
        if self.method == "fwsvd":
            fisher = passes.fisher_row_importance(model, dict(matched), state.data.calib, self.fisher_batches)
            fisher = distributed.sum_over_ranks(fisher)
            self._row_scale = {
                name: I.clamp_min(1e-12 * I.max().clamp_min(1e-30)).sqrt() for name, I in fisher.items()
            }
        for name, linear in matched:
            m, n = linear.out_features, linear.in_features
            k = rank_for_ratio(m, n, self._ratio_for(name), self.rank_multiple)
            if not saves_parameters(m, n, k):
                self._kept_dense.append(name)
                logger.info("{} ({}x{}): rank {} saves nothing, kept dense", name, m, n, k)
                continue
            layer = SVDLinear.from_linear(linear, k)
            replace_module(model, name, layer)
            self._layers[name] = layer
        if not self._layers:
            shapes = [(l.out_features, l.in_features, self._ratio_for(n)) for n, l in matched]
            unrounded = [rank_for_ratio(m, n, r) for m, n, r in shapes]
            too_coarse = any(saves_parameters(m, n, k) for (m, n, _), k in zip(shapes, unrounded))
            raise ValueError(
                f"SVDLLMModifier: none of the {len(matched)} matched matrices saves parameters "
                f"at ratio={self._ratio}; "
                + (f"`rank_multiple: {self.rank_multiple}` is larger than the ranks these matrices allow "
                   f"(at most {max(unrounded)}); lower `rank_multiple`" if too_coarse else "raise `ratio`")
            )
        _check_group_sizes(self, self._layers)
        logger.info(
            "SVDLLMModifier: {} Linears to factorize ({} kept dense), method={}, ratio={:.4f}, allocation={}",
            len(self._layers),
            len(self._kept_dense),
            self.method,
            self._ratio,
            self.allocation,
        )
        return True

    def _resolve_ratio(self, model: nn.Module, matched) -> float:
        """The per-matrix ratio; a whole-model budget is spread over the targeted matrices."""
        if self.model_ratio is None:
            return self.ratio
        whole = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        targeted = sum(lin.weight.numel() for _, lin in matched)
        ratio = self.model_ratio * whole / targeted
        if not 0.0 < ratio < 1.0:
            raise ValueError(
                f"model_ratio={self.model_ratio} would remove {ratio:.0%} of the targeted matrices "
                f"({targeted:,} of {whole:,} parameters); lower `model_ratio` or target more modules"
            )
        return ratio

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        names = {m: n for n, m in self._layers.items()}
        self._collector = StatisticsCollector(names=names, want=self._wanted())
        handles = {
            self.register_hook(layer, self._observe, "forward_pre")
            for layer in self._layers.values()
            if layer.pending
        }
        if self.closed_form_update:  # whitening needs the ORIGINAL model's statistics
            self._start_original_stream(state, names, handles)

    def _observe(self, module: nn.Module, args: tuple) -> None:
        """Statistics hook: the original stream's rerun feeds the original-statistics collector."""
        stream = self._stream
        collector = self._original if stream is not None and stream.active else self._collector
        collector(module, args)

    def _start_original_stream(self, state: State, names: dict, handles: set) -> None:
        """Carry the original model's activations beside the propagated ones (O(one layer)
        statistics), or, for a model without known decoder layers, collect every layer's
        original X X^T in one pass up front (O(model))."""
        self._original = StatisticsCollector(names=names, want=frozenset({"H"}))
        layers = decoder_layers(state.model)
        if not layers:
            logger.warning(
                "closed_form_update: no decoder layers found (model._no_split_modules); collecting the "
                "original statistics of every layer in one pass first (memory grows with the model)"
            )
            self._original = passes.collect_statistics(state.model, self._layers, state.data.calib)
            return
        from llmcompressor.modifiers.utils.hooks import HooksMixin

        self._stream = OriginalStream(quiet=lambda: HooksMixin.disable_hooks(keep=handles))
        for layer in layers:
            self.register_hook(layer, self._stream.pre_hook, "forward_pre", with_kwargs=True)

    def _wanted(self) -> frozenset:
        """Statistics the method reads: X X^T (whitening, update), |x| (ASVD), or none."""
        want = {"svd_llm": {"H"}, "svd_llm_v2": {"H"}, "asvd": {"abs"}}.get(self.method, set())
        return frozenset(want | ({"H"} if self.closed_form_update else set()))

    def on_sequential_epoch_end(self, state: State, event: Event, modules=None, **kwargs):
        self._compress_ready()

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._compress_ready()
        self.remove_hooks()
        if self._spectra:
            self._allocate(state)
        missed = [name for name, layer in self._layers.items() if name not in self._done]
        if missed:
            raise RuntimeError(
                f"Failed to compress {len(missed)} modules that saw no calibration data: "
                f"{missed[:5]}... Check that they run in the model's forward."
            )
        for layer in self._layers.values():
            layer.activate()
        if self._stream is not None:
            self._stream.release()
        self._collector = self._original = self._stream = None
        self._spectra = {}

    def on_finalize(self, state: State, **kwargs) -> bool:
        if self._records:
            before = sum(r["params_before"] for r in self._records)
            after = sum(r["params_after"] for r in self._records)
            logger.info(
                "SVDLLMModifier: {} modules, targeted parameters {:,} -> {:,} ({:.1%} removed)",
                len(self._records),
                before,
                after,
                1 - after / before,
            )
        return True

    # ---- work -----------------------------------------------------------------------
    @property
    def _done(self) -> set[str]:
        return {r["name"] for r in self._records}

    @property
    def sensitivity_cost(self) -> dict:
        """What the sensitivity search cost: seconds, evaluations, batches."""
        return dict(self._sensitivity_cost)

    @property
    def records(self) -> list[dict]:
        """One dict per compressed module: name, shape, rank, loss, time."""
        return list(self._records)

    def _compress_ready(self) -> None:
        """Decompose every pending layer whose statistics are complete (its layer ran), then
        free those statistics: memory holds the statistics of one decoder layer at a time."""
        collector = self._collector
        if collector is None:
            return
        ready = [
            (n, l)
            for n, l in self._layers.items()
            if n not in self._done
            and n not in self._spectra
            and collector.get(l)
            and (self._original is None or self._original.get(l))
        ]
        whitened: dict[int, torch.Tensor | None] = {}  # one whitening per shared input
        jobs = {name: (tuple(layer.dense_weight.shape), self._statistics_of(layer)) for name, layer in ready}
        results = distributed.decompose_on_owners(  # a plain loop unless under torchrun
            jobs, self._wanted(), lambda name: self._factors(name, whitened)
        )
        for name, layer in ready:
            self._apply(name, layer, *results[name], collector.get(layer).tokens)
        collector.release(layer for _, layer in ready)
        if self._original is not None:
            self._original.release(layer for _, layer in ready)

    def _statistics_of(self, layer: SVDLinear) -> list:
        """The statistics ``_factors`` reads, the layer's input group first."""
        stats = [self._collector.get(layer)]
        return stats + ([self._original.get(layer)] if self._original is not None else [])

    def _factors(self, name: str, whitened: dict) -> tuple[Factors, float]:
        """(factors, seconds) of one pending layer; under torchrun only its owner rank runs this."""
        layer = self._layers[name]
        stats = self._collector.get(layer)
        original = self._original.get(layer) if self._original is not None else stats
        start = time.perf_counter()
        S = self._weighting(original, name, whitened)
        W = layer.dense_weight  # (m, n), onloaded
        k = layer.rank if self.allocation == "uniform" else self._stored_rank(layer)
        factors = factorize(W, k, S, self._row_scale.get(name), self.sigma)
        if self.closed_form_update:  # stats are the propagated inputs here
            factors.W_u = refit_u(W, factors.W_v, stats.covariance())
        return factors, time.perf_counter() - start

    def _apply(self, name: str, layer: SVDLinear, factors: Factors, seconds: float, tokens: int) -> None:
        """Write the factors into the layer (every rank) and record them."""
        if self.allocation != "uniform":
            # keep only the spectrum here; the factors, capped at the largest rank the
            # allocation may choose, go into the layer itself (offloaded with the model)
            self._uniform[name] = layer.rank
            layer.set_factors(factors.W_u, factors.W_v)
            self._spectra[name], self._tokens[name] = factors.sigma.cpu(), tokens
            self._seconds[name] = seconds  # non-uniform: ranks are chosen at calibration end
            return
        layer.set_factors(factors.W_u, factors.W_v)
        if self.activations == "propagated" or self.closed_form_update:
            layer.activate()
        self._record(name, layer, factors, tokens, seconds)

    def _stored_rank(self, layer: SVDLinear) -> int:
        """The largest rank the allocation can give this layer (what is kept until it runs)."""
        if self.allocation == "loss":
            return min(_max_rank(layer), max(layer.rank, int(layer.rank * (1 + LOSS_SPREAD))))
        return _max_rank(layer)

    def _allocate(self, state: State) -> None:
        """Choose all ranks at once from the spectra, then truncate the stored factors, one
        layer at a time."""
        matrices = [
            Matrix(n, self._layers[n].out_features, self._layers[n].in_features, sigma)
            for n, sigma in self._spectra.items()
        ]
        uniform = {n: self._uniform[n] for n in self._spectra}
        start = time.perf_counter()
        if self.allocation == "loss":
            ranks = allocate_by_loss(matrices, uniform, self.rank_multiple, LOSS_SPREAD)
        else:
            target = sum(m.m * m.n - uniform[m.name] * (m.m + m.n) for m in matrices)
            ranks = allocate_by_sensitivity(matrices, self._sensitivity(state), target, self.rank_multiple)
        logger.info(
            "{} allocation chose {} ranks in {:.1f}s",
            self.allocation,
            len(ranks),
            time.perf_counter() - start,
        )
        for name, sigma in self._spectra.items():
            layer = self._layers[name]
            k = min(ranks[name], layer.rank)
            W_u, W_v = layer.factors()
            factors = Factors(W_u[:, :k], W_v[:k], sigma, truncation_loss(sigma, k))
            layer.set_factors(factors.W_u, factors.W_v)
            self._record(name, layer, factors, self._tokens.get(name, 0), self._seconds.get(name, 0.0))

    def _sensitivity(self, state: State) -> dict[str, dict[float, float]]:
        """ASVD: perplexity on calibration batches with only one matrix truncated at each ratio."""
        from tqdm import tqdm

        model = state.model
        batches = passes.perplexity_batches(model, state.data.calib, self.sensitivity_batches)
        start = time.perf_counter()
        base = passes.calibration_loss(model, batches)
        ppl: dict[str, dict[float, float]] = {}
        for name in tqdm(list(self._spectra), desc="Sensitivity"):
            layer = self._layers[name]
            W_u, W_v = layer.factors()  # stored at the largest rank: one layer in memory at a time
            ppl[name] = {}
            for ratio in self.sensitivity_ratios:
                k = min(
                    rank_for_ratio(layer.out_features, layer.in_features, ratio, self.rank_multiple),
                    layer.rank,
                )
                W_k = W_u[:, :k] @ W_v[:k]  # (m, n)
                with passes.replaced_output(layer, W_k):
                    ppl[name][ratio] = passes.safe_exp(passes.calibration_loss(model, batches))
            del W_u, W_v
        seconds = time.perf_counter() - start
        self._sensitivity_cost = dict(
            seconds=seconds,
            evaluations=len(self._spectra) * len(self.sensitivity_ratios),
            batches=len(batches),
            base_ppl=passes.safe_exp(base),
        )
        logger.info(
            "Sensitivity search: {} evaluations x {} batches in {:.1f}s (dense calibration ppl {:.3f})",
            self._sensitivity_cost["evaluations"],
            len(batches),
            seconds,
            self._sensitivity_cost["base_ppl"],
        )
        return ppl

    def _weighting(self, stats, name: str, cache: dict) -> torch.Tensor | None:
        """The right weighting S of the method (S S^T = X X^T, or ASVD's diagonal as a vector);
        cached per statistics object (shared inputs). Only the latest is kept: modules that share
        an input come one after another, and one n x n float64 S at a time is what memory allows."""
        key = id(stats)
        if key not in cache:
            cache.clear()
            if self.method in ("svd", "fwsvd"):  # FWSVD weights rows, not inputs
                cache[key] = None
            elif self.method == "asvd":
                stat = (
                    stats.abs_sum / max(stats.tokens, 1)
                    if self.asvd_statistic == "abs_mean"
                    else stats.abs_max
                )
                s = stat.clamp_min(1e-6) ** self.asvd_alpha  # (n,)
                cache[key] = s
            elif self.whitening == "eigh":
                cache[key] = whiten_eigh(stats.covariance())
            else:
                cache[key] = whiten_cholesky(stats.covariance(), name)
        return cache[key]

    def _record(self, name: str, layer: SVDLinear, factors, tokens: int, seconds: float) -> None:
        m, n, k = layer.out_features, layer.in_features, layer.rank
        total = float((factors.sigma.to(torch.float64) ** 2).sum())
        record = dict(
            name=name,
            m=m,
            n=n,
            rank=k,
            params_before=m * n,
            params_after=k * (m + n),
            loss=factors.loss,
            rel_loss=factors.loss / total if total > 0 else 0.0,
            tokens=tokens,
            seconds=seconds,
        )
        self._records.append(record)
        logger.info(
            "{} ({}x{}) rank {} | params -{:.1%} | truncation loss {:.4g} (rel {:.2e}) | {} tokens | {:.2f}s",
            name,
            m,
            n,
            k,
            1 - record["params_after"] / record["params_before"],
            record["loss"],
            record["rel_loss"],
            tokens,
            seconds,
        )

    def _ratio_for(self, name: str) -> float:
        for pattern, ratio in self.overrides.items():
            if _matches(name, pattern):
                return ratio
        return self._ratio


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _max_rank(layer: SVDLinear) -> int:
    """Largest rank that still saves parameters (what non-uniform allocations may give)."""
    m, n = layer.out_features, layer.in_features
    return max(1, (m * n - 1) // (m + n))


def _inside_svd_linear(name: str) -> bool:
    return name.endswith((".svd_u", ".svd_v"))


def _check_group_sizes(modifier: Modifier, layers: dict[str, SVDLinear]) -> None:
    """Fail at initialize when a later quantization modifier's group size does not divide a rank.

    svd_u's input width is the rank k, and group quantization splits the input columns into
    whole groups: GPTQ would fail only after the SVD calibration has run.
    """
    from compressed_tensors.utils import match_targets
    from llmcompressor.core import active_session

    modifiers = list(getattr(active_session().lifecycle.recipe, "modifiers", None) or [])
    position = next((i for i, m in enumerate(modifiers) if m is modifier), None)
    if position is None:
        return
    for later in modifiers[position + 1 :]:
        if not hasattr(later, "resolve_quantization_config"):
            continue
        config = later.resolve_quantization_config()
        for scheme in config.config_groups.values():
            group_size = getattr(scheme.weights, "group_size", None)
            if not group_size or group_size < 1:
                continue
            for name, layer in layers.items():
                child = f"{name}.svd_u"
                if layer.rank % group_size == 0 or not match_targets(child, layer.svd_u, scheme.targets):
                    continue
                if match_targets(child, layer.svd_u, config.ignore):
                    continue
                raise ValueError(
                    f"{type(later).__name__} quantizes {child} in groups of {group_size} input columns, but "
                    f"its input width is the SVD rank {layer.rank}, not a multiple of {group_size}; set "
                    f"`rank_multiple: {group_size}` in SVDLLMModifier"
                )
