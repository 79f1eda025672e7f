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

Where the rest lives: the settings and their checks in ``options.py``; ranks (budget,
rounding, allocation, sensitivity search) in ``ranks.py``; the per-layer fit (what each method
and update does) in ``fit.py``, its math in ``decompose.py``; the per-layer report in
``record.py``; whole-model passes (FWSVD's Fisher, ...) in ``passes.py``; statistics in
``statistics.py``, the original stream in ``original.py``, intra-layer replay in ``intra.py``.
"""

from __future__ import annotations

import functools
import time

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from loguru import logger
from pydantic import PrivateAttr
from torch import nn

from svdllm_plugin import distributed
from svdllm_plugin.layers import SVDLinear, replace_module
from svdllm_plugin.modifiers.svd import passes, ranks
from svdllm_plugin.modifiers.svd.decompose import Factors
from svdllm_plugin.modifiers.svd.fit import METHODS, UPDATES, Fit, row_scales
from svdllm_plugin.modifiers.svd.intra import LayerInputs, groups_in_order, hold_layer_inputs, replay_groups
from svdllm_plugin.modifiers.svd.options import SVDLLMOptions
from svdllm_plugin.modifiers.svd.original import OriginalStream, carry_original, decoder_layers
from svdllm_plugin.modifiers.svd.record import LayerRecord, log_summary
from svdllm_plugin.modifiers.svd.statistics import StatisticsCollector

__all__ = ["SVDLLMModifier"]


class SVDLLMModifier(SVDLLMOptions):
    """Compress Linears into W_u (m, k) @ W_v (k, n) after whitening by calibration data;
    the settings are listed in ``SVDLLMOptions`` (``options.py``)."""

    _layers: dict[str, SVDLinear] = PrivateAttr(default_factory=dict)
    _collector: StatisticsCollector | None = PrivateAttr(default=None)
    _records: list[LayerRecord] = PrivateAttr(default_factory=list)
    _kept_dense: list[str] = PrivateAttr(default_factory=list)
    _row_scale: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _original: StatisticsCollector | None = PrivateAttr(default=None)
    _stream: OriginalStream | None = PrivateAttr(default=None)
    _inputs: LayerInputs | None = PrivateAttr(default=None)  # intra_layer: this layer's inputs
    _stat_handles: set = PrivateAttr(default_factory=set)
    _spectra: ranks.Spectra = PrivateAttr(default_factory=ranks.Spectra)  # non-uniform allocations
    _ratio: float = PrivateAttr(default=0.2)
    _sensitivity_cost: dict = PrivateAttr(default_factory=dict)
    _achieved_ratio: float = PrivateAttr(default=0.0)
    _fit: Fit = PrivateAttr(default_factory=Fit)  # the options the per-layer fit reads, resolved
    _objectives: dict[str, dict] = PrivateAttr(default_factory=dict)  # update objectives, for records

    @property
    def fit(self) -> Fit:
        """The per-layer fit this modifier runs: its options, with ``sigma: auto`` and
        ``rotation: auto`` resolved at initialize (read-only)."""
        return self._fit

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the targeted matrices' parameters the chosen ranks remove (dense ones count 0)."""
        return self._achieved_ratio

    # ---- lifecycle ------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        matched = _dense_linears(model, self.targets, self.ignore)
        if UPDATES[self.update].cross and distributed.is_distributed():
            raise ValueError(
                f"update={self.update!r} pairs original and compressed inputs token by token; its cross "
                "statistics are not reduced across torchrun ranks yet: run it in one process, or use "
                "`update: input` under torchrun"
            )
        self._ratio = ranks.resolve_ratio(model, matched, self.ratio, self.model_ratio)
        if METHODS[self.method].rows == "fisher" or self.row_weighting == "fisher":
            fisher = passes.fisher_row_importance(model, dict(matched), state.data.calib, self.fisher_batches)
            self._row_scale = row_scales(distributed.sum_over_ranks(fisher))
        ratios = {name: ranks.ratio_for(name, self.overrides, self._ratio) for name, _ in matched}
        chosen = ranks.uniform_ranks(matched, ratios, self.rank_multiple, self._ratio)
        for name, linear in matched:
            if name not in chosen:
                self._kept_dense.append(name)
                continue
            layer = SVDLinear.from_linear(linear, chosen[name])
            replace_module(model, name, layer)
            self._layers[name] = layer
        quantized = ranks.check_group_sizes(self, self._layers)
        self._fit = Fit.resolve(self, quantized)
        self._achieved_ratio = ranks.achieved_ratio(matched, self._layers)
        logger.info(
            "SVDLLMModifier: {} Linears to factorize ({} kept dense), method={}, ratio={:.4f} "
            "(ranks remove {:.4f}), allocation={}, update={}",
            len(self._layers),
            len(self._kept_dense),
            self.method,
            self._ratio,
            self._achieved_ratio,
            self.allocation,
            self.update,
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        names = {m: n for n, m in self._layers.items()}
        self._collector = StatisticsCollector(names=names, want=self._fit.statistics)
        handles = {
            self.register_hook(layer, self._observe, "forward_pre")
            for layer in self._layers.values()
            if layer.pending
        }
        self._stat_handles = handles
        if UPDATES[self.update].original:  # the ORIGINAL model's statistics beside the propagated
            self._original, self._stream = carry_original(
                state.model,
                self._layers,
                self._collector,
                UPDATES[self.update].cross,
                state.data.calib,
                handles,
                self.register_hook,
            )
        if self.intra_layer:
            self._inputs = hold_layer_inputs(decoder_layers(state.model), self.register_hook)

    def _observe(self, module: nn.Module, args: tuple) -> None:
        """Statistics hook: the original stream's rerun feeds the original-statistics collector."""
        stream = self._stream
        collector = self._original if stream is not None and stream.active else self._collector
        collector(module, args)

    def on_sequential_epoch_end(self, state: State, event: Event, modules=None, **kwargs):
        if self._inputs is not None:
            self._compress_within_layer()
        else:
            self._compress_ready()

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._compress_ready()
        self.remove_hooks()
        if self._spectra.sigma:
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
        if self._inputs is not None:
            self._inputs.release()
        self._collector = self._original = self._stream = self._inputs = None
        self._spectra = ranks.Spectra()

    def on_finalize(self, state: State, **kwargs) -> bool:
        log_summary(self._records)
        return True

    # ---- work -----------------------------------------------------------------------
    @property
    def _done(self) -> set[str]:
        return {r.name for r in self._records}

    @property
    def sensitivity_cost(self) -> dict:
        """What the sensitivity search cost: seconds, evaluations, batches."""
        return dict(self._sensitivity_cost)

    @property
    def records(self) -> list[dict]:
        """One dict per compressed module: name, shape, rank, loss, time (``record.LayerRecord``)."""
        return [r.as_dict() for r in self._records]

    def _compress_within_layer(self) -> None:
        """intra_layer: compress each decoder layer's input groups in forward order, rerunning the
        layer on its held inputs before each later group so its statistics see the compressed
        groups before it (see ``intra.py``)."""
        collector, inputs = self._collector, self._inputs
        names = {m: n for n, m in self._layers.items()}
        groups = groups_in_order(collector.leader, names, {name for name, _ in self._ready()})
        if groups and not inputs.held:
            raise RuntimeError(
                "intra_layer reruns each decoder layer, but the calibration pipeline called none as a "
                "module (its sequential targets are not the decoder layers); set `intra_layer: false`"
            )
        replay_groups(inputs, collector, self._layers, groups, self._stat_handles, self._compress_ready)
        self._compress_ready()  # Linears outside the decoder layers, if any: no rerun
        inputs.release()

    def _ready(self, only: set[str] | None = None) -> list[tuple[str, SVDLinear]]:
        """Pending layers whose statistics are complete (their decoder layer ran)."""
        collector = self._collector
        return [
            (n, l)
            for n, l in self._layers.items()
            if (only is None or n in only)
            and n not in self._done
            and n not in self._spectra.sigma
            and collector.get(l)
            and (self._original is None or self._original.get(l))
        ]

    def _compress_ready(self, only: set[str] | None = None) -> None:
        """Decompose every pending layer whose statistics are complete (its layer ran), then
        free those statistics: memory holds the statistics of one decoder layer at a time."""
        collector = self._collector
        if collector is None:
            return
        ready = self._ready(only)
        whitened: dict[int, torch.Tensor | None] = {}  # one whitening per shared input
        jobs = {name: (tuple(layer.dense_weight.shape), self._statistics_of(layer)) for name, layer in ready}
        results = distributed.decompose_on_owners(  # a plain loop unless under torchrun
            jobs, self._fit.statistics, lambda name: self._factors(name, whitened)
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
        W = layer.dense_weight  # (m, n), onloaded
        row_scale = self._row_scale.get(name)
        if self.allocation != "uniform":  # capped at the largest rank the allocation may choose
            k = ranks.stored_rank(layer, self.allocation)
            return self._fit.truncate(W, k, original, row_scale, name, whitened), time.perf_counter() - start
        factors, objective = self._fit.layer(W, layer.rank, stats, original, row_scale, name, whitened)
        if objective:  # the update's own objective, for the record (owner rank)
            self._objectives[name] = objective
        return factors, time.perf_counter() - start

    def _apply(self, name: str, layer: SVDLinear, factors: Factors, seconds: float, tokens: int) -> None:
        """Write the factors into the layer (every rank) and record them."""
        if self.allocation != "uniform":  # ranks are chosen at calibration end
            self._spectra.add(name, layer, factors, tokens, seconds)
            return
        layer.set_factors(factors.W_u, factors.W_v)
        if self.propagates:
            layer.activate()
        self._record(name, layer, factors, tokens, seconds, **self._objectives.pop(name, {}))

    def _allocate(self, state: State) -> None:
        """Choose all ranks at once from the spectra, then truncate the stored factors, one
        layer at a time."""
        spectra = self._spectra
        measure = functools.partial(self._sensitivity, state)  # run by the sensitivity allocation only
        chosen = spectra.choose(self.allocation, self._layers, self._ratio, self.rank_multiple, measure)
        for name, layer, factors in spectra.truncate(self._layers, chosen, self._fit.rotate):
            self._record(name, layer, factors, spectra.tokens.get(name, 0), spectra.seconds.get(name, 0.0))

    def _sensitivity(self, state: State) -> dict[str, dict[float, float]]:
        """ASVD: perplexity with only one matrix truncated at each candidate ratio (``ranks.py``)."""
        ppl, self._sensitivity_cost = ranks.sensitivity_search(
            state.model,
            self._layers,
            list(self._spectra.sigma),
            state.data.calib,
            self.sensitivity_ratios,
            self.sensitivity_batches,
            self.rank_multiple,
        )
        return ppl

    def _record(self, name: str, layer: SVDLinear, factors: Factors, tokens: int, seconds: float, **extra):
        self._records.append(LayerRecord.of(name, layer, factors, tokens, seconds, **extra))
        self._records[-1].log()


def _dense_linears(model: nn.Module, targets: list[str], ignore: list[str]) -> list[tuple[str, nn.Linear]]:
    """The Linears to compress (never a factor ``svd_u`` / ``svd_v`` of an SVDLinear); fails when none."""
    matched = [
        (name, module)
        for name, module in match_named_modules(model, targets, ignore)
        if isinstance(module, nn.Linear) and not name.endswith((".svd_u", ".svd_v"))
    ]
    if not matched and any(isinstance(m, SVDLinear) for m in model.modules()):
        raise ValueError(
            "SVDLLMModifier: the model is already factorized (it has SVDLinear modules and no "
            "dense Linear left to compress); start from the dense model"
        )
    if not matched:
        raise ValueError(
            f"SVDLLMModifier found no Linear modules matching targets={targets} "
            f"(ignore={ignore}). Please check `targets` in the recipe."
        )
    return matched
