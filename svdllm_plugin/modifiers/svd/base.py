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
from dataclasses import dataclass
from typing import Literal

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn

from svdllm_plugin.layers import SVDLinear, replace_module
from svdllm_plugin import distributed
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
    factorize,
    max_rank,
    output_match,
    output_objective,
    params_of,
    rank_for_ratio,
    refit_u,
    removed_fraction,
    rotate_factors,
    round_ranks,
    saves_parameters,
    truncation_loss,
    whiten_cholesky,
    whiten_eigh,
)
from svdllm_plugin.modifiers.svd.intra import LayerInputs, groups_in_order
from svdllm_plugin.modifiers.svd.original import OriginalStream, decoder_layers
from svdllm_plugin.modifiers.svd.statistics import StatisticsCollector

__all__ = ["SVDLLMModifier"]

LOSS_SPREAD = 0.5  # `loss` allocation: each rank stays within (1 -/+ spread) x its uniform rank

Method = Literal["svd_llm", "svd_llm_v2", "svd", "asvd", "fwsvd"]
Update = Literal["none", "input", "output", "output_u"]


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


@dataclass(frozen=True)
class UpdateSpec:
    """A closed-form update after the truncation (one entry per ``update``).

    original: statistics of the ORIGINAL model's inputs are carried beside the propagated
    ones (the original stream); cross: C = X X'^T of paired original / propagated inputs;
    propagated: factors switch on at once so later layers see the compressed model.
    """

    original: bool
    cross: bool
    propagated: bool


UPDATES: dict[str, UpdateSpec] = {
    "none": UpdateSpec(original=False, cross=False, propagated=False),
    "input": UpdateSpec(original=True, cross=False, propagated=True),  # SVD-LLM: W_u W_v X' ~ W X'
    "output": UpdateSpec(original=True, cross=True, propagated=True),  # W_u W_v X' ~ W X (original)
    "output_u": UpdateSpec(original=True, cross=True, propagated=True),  # same target, W_v kept
}


class SVDLLMModifier(Modifier):
    """Compress Linears into W_u (m, k) @ W_v (k, n) after whitening by calibration data.

    :param targets: modules to compress, llmcompressor matching style (class names or
        ``re:`` patterns on module names). Default: every Linear.
    :param ignore: modules never compressed. Default: the (possibly tied) lm_head.
    :param ratio: fraction of each targeted matrix's parameters REMOVED, in (0, 1);
        rank k = floor(m n (1 - ratio) / (m + n)) (see ``rank_multiple``). A matrix that would
        save nothing stays dense.
    :param overrides: per-module ratios, ``{pattern: ratio}``; the first pattern that
        matches a module name (``re:`` regex or exact suffix) wins.
    :param method: ``svd_llm`` (whitening by ``whitening``), ``svd_llm_v2``
        (eigendecomposition whitening: no positive-definite requirement), ``svd`` (plain,
        ignores data), ``asvd`` (activation-aware channel scaling).
    :param whitening: ``cholesky`` (SVD-LLM, with a logged diagonal shift when X X^T is not
        positive definite) or ``eigh`` (pseudo-inverse, works on singular statistics).
    :param rank_multiple: ranks are multiples of this (e.g. 8; the GPTQ group size when the
        factors are quantized, since svd_u's input width is the rank): each rank is rounded
        down or up, rebalanced so the parameters removed match the ratio (``achieved_ratio``).
    :param sigma: where Sigma goes: ``split`` (Sigma^1/2 on both), ``u`` or ``v``; ``auto``
        (default): ``v`` when a later modifier of the recipe quantizes ``svd_u``, else
        ``split``. With ``v``, W_u = U_k has orthonormal columns of even scale; with ``split``
        a dominant sigma_1 (the massive-activation direction of down_proj's input) makes one
        column of W_u dwarf the others in its quantization group, which then round to zero.
    :param rotation: ``random`` multiplies the factors by a seeded random orthogonal k x k
        matrix, W_u R^T and R W_v (same product): in the singular basis svd_u's input Hessian
        is diagonal, so GPTQ cannot compensate any rounding of W_u (it degenerates to
        round-to-nearest); rotated, it can, and dominant directions are spread over all
        columns. ``auto`` (default): ``random`` when a later modifier quantizes ``svd_u``.
    :param activations: statistics from the ``original`` model's activations (the paper)
        or from the ``propagated`` outputs of already-compressed layers.
    :param asvd_alpha: ASVD exponent, scale s_j = stat_j ** alpha.
    :param asvd_statistic: ``abs_mean`` or ``abs_max`` of each input channel.
    :param model_ratio: alternative to ``ratio``: fraction of the WHOLE model's parameters
        to remove, spread over the targeted matrices.
    :param allocation: ``uniform`` (same ratio everywhere), ``loss`` (greedy on relative
        truncation loss within each matrix type, ranks within 0.5x-1.5x uniform), ``v2``
        (SVD-LLM V2's published formula within each type: R_i proportional to 1 / log L_i of
        the absolute loss), ``global`` (one budget over all types, greedy on absolute whitened
        loss per parameter, 0.5x-1.5x uniform) or ``sensitivity`` (ASVD's perplexity search
        to the same global budget).
    :param row_weighting: ``fisher`` weights W's rows by sqrt of FWSVD's Fisher row
        importance (a backward pass per batch) on top of the method's input weighting, e.g.
        whitening: SVD of diag(r) W S.
    :param update: closed-form update on the compressed model's (propagated) inputs X',
        with the original model's activations carried beside them (one more forward of each
        decoder layer): ``input`` (SVD-LLM's: whiten with the original statistics, refit W_u
        so that W_u W_v X' matches W X'), ``output`` (the rank-k W' minimising
        ||W X - W' X'|| for the ORIGINAL inputs X: pulls outputs back to the original
        model's; an (n, n) least-squares map, which can over-fit the calibration tokens),
        ``output_u`` (the same target, W_v of the whitened truncation kept and only W_u refit:
        a k x k system, never worse on the objective than truncation or ``input``), or ``none``.
    :param intra_layer: collect each Linear's statistics after the Linears before it in the
        same decoder layer are compressed (o_proj sees the compressed q/k/v, down_proj the
        compressed gate/up): one more forward of the decoder layer per input group after the
        first. Needs propagation (``activations: propagated`` or ``update: input``).
    :param closed_form_update: ``true`` is ``update: input`` (recipes before ``update``); it
        reads true whenever an update is on.
    :param update_damp: relative ridge on the update's linear system (diagonal += damp x its
        mean): larger values shrink the fit.
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
    sigma: Literal["auto", "split", "u", "v"] = "auto"
    rotation: Literal["auto", "none", "random"] = "auto"
    activations: Literal["original", "propagated"] = "original"
    asvd_alpha: float = 0.5
    asvd_statistic: Literal["abs_mean", "abs_max"] = "abs_mean"
    model_ratio: float | None = None
    allocation: Literal["uniform", "loss", "v2", "global", "sensitivity"] = "uniform"
    row_weighting: Literal["none", "fisher"] = "none"
    update: Update = "none"
    update_damp: float = 1e-6
    intra_layer: bool = False
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
    _inputs: LayerInputs | None = PrivateAttr(default=None)  # intra_layer: this layer's inputs
    _stat_handles: set = PrivateAttr(default_factory=set)
    _collecting: set | None = PrivateAttr(default=None)  # intra_layer replay: the group collected
    _spectra: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)  # full sigma, non-uniform
    _uniform: dict[str, int] = PrivateAttr(default_factory=dict)  # ranks before allocation
    _ratio: float = PrivateAttr(default=0.2)
    _sensitivity_cost: dict = PrivateAttr(default_factory=dict)
    _seconds: dict[str, float] = PrivateAttr(default_factory=dict)  # deferred factorizations
    _tokens: dict[str, int] = PrivateAttr(default_factory=dict)
    _achieved_ratio: float = PrivateAttr(default=0.0)
    _sigma: str = PrivateAttr(default="split")
    _rotate: bool = PrivateAttr(default=False)
    _objectives: dict[str, dict] = PrivateAttr(default_factory=dict)  # update objectives, for records

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
        spec = METHODS[self.method]
        if spec.whitening is not None:
            self.whitening = spec.whitening
        if self.closed_form_update and self.update == "none":
            self.update = "input"
        self.closed_form_update = self.update != "none"  # compress.single_pass reads it
        if self.allocation != "uniform" and self.activations != "original":
            raise ValueError(
                f"allocation={self.allocation!r} chooses ranks from every layer's spectrum at the end "
                "of calibration; it needs `activations: original`"
            )
        if self.update != "none" and (self.activations != "original" or self.allocation != "uniform"):
            raise ValueError(
                f"update={self.update!r} carries the original statistics beside the propagated inputs; "
                "it needs `activations: original` and `allocation: uniform`"
            )
        if self.update.startswith("output") and self.row_weighting != "none":
            raise ValueError("update='output' fits the original outputs unweighted; use row_weighting: none")
        if self.update != "none" and spec.weighting != "whiten":
            raise ValueError(f"update={self.update!r} applies to the whitening methods svd_llm / svd_llm_v2")
        if self.intra_layer and not self.propagates:
            raise ValueError(
                "intra_layer collects statistics on the compressed model's own activations; it needs "
                "`activations: propagated` or `update: input`"
            )
        if self.intra_layer and UPDATES[self.update].cross:
            raise ValueError(
                f"intra_layer cannot be combined with update={self.update!r} (its cross statistics pair "
                "the original stream batch by batch); use `update: input`"
            )
        return self

    @property
    def propagates(self) -> bool:
        """Whether calibration must see the compressed model's outputs (error propagation on)."""
        return self.activations == "propagated" or UPDATES[self.update].propagated

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the targeted matrices' parameters the chosen ranks remove (dense ones count 0)."""
        return self._achieved_ratio

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
        if UPDATES[self.update].cross and distributed.is_distributed():
            raise ValueError(
                f"update={self.update!r} pairs original and compressed inputs token by token; its cross "
                "statistics are not reduced across torchrun ranks yet: run it in one process, or use "
                "`update: input` under torchrun"
            )
        self._ratio = self._resolve_ratio(model, matched)
        if METHODS[self.method].rows == "fisher" or self.row_weighting == "fisher":
            fisher = passes.fisher_row_importance(model, dict(matched), state.data.calib, self.fisher_batches)
            fisher = distributed.sum_over_ranks(fisher)
            self._row_scale = {
                name: I.clamp_min(1e-12 * I.max().clamp_min(1e-30)).sqrt() for name, I in fisher.items()
            }
        shapes = [(lin.out_features, lin.in_features, self._ratio_for(name)) for name, lin in matched]
        ranks = round_ranks(shapes, self.rank_multiple)
        for (name, linear), k in zip(matched, ranks):
            m, n = linear.out_features, linear.in_features
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
                + (
                    f"`rank_multiple: {self.rank_multiple}` is larger than the ranks these matrices allow "
                    f"(at most {max(unrounded)}); lower `rank_multiple`"
                    if too_coarse
                    else "raise `ratio`"
                )
            )
        quantized = _check_group_sizes(self, self._layers)
        self._sigma = ("v" if quantized else "split") if self.sigma == "auto" else self.sigma
        self._rotate = quantized if self.rotation == "auto" else self.rotation == "random"
        self._achieved_ratio = removed_fraction(
            [(lin.out_features, lin.in_features) for _, lin in matched],
            [self._layers[name].rank if name in self._layers else 0 for name, _ in matched],
        )
        self._achieved_ratio += sum(
            lin.out_features * lin.in_features for name, lin in matched if name not in self._layers
        ) / sum(lin.out_features * lin.in_features for _, lin in matched)  # dense: nothing removed
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
        self._stat_handles = handles
        if UPDATES[self.update].original:  # the ORIGINAL model's statistics beside the propagated
            self._start_original_stream(state, names, handles)
        if self.intra_layer:
            layers = decoder_layers(state.model)
            if not layers:
                raise ValueError(
                    "intra_layer reruns each decoder layer, but the model names none "
                    "(model._no_split_modules); set `intra_layer: false`"
                )
            self._inputs = LayerInputs()
            for layer in layers:
                self.register_hook(layer, self._inputs.pre_hook, "forward_pre", with_kwargs=True)

    def _observe(self, module: nn.Module, args: tuple) -> None:
        """Statistics hook: the original stream's rerun feeds the original-statistics collector."""
        if self._collecting is not None and module not in self._collecting:
            return  # an intra-layer replay collects one input group
        stream = self._stream
        collector = self._original if stream is not None and stream.active else self._collector
        collector(module, args)

    def _start_original_stream(self, state: State, names: dict, handles: set) -> None:
        """Carry the original model's activations beside the propagated ones (O(one layer)
        statistics), or, for a model without known decoder layers, collect every layer's
        original X X^T in one pass up front (O(model))."""
        cross = UPDATES[self.update].cross
        self._original = StatisticsCollector(names=names, want=frozenset({"H"}), keep_inputs=cross)
        if cross:
            self._collector.pair_with = self._original
        layers = decoder_layers(state.model)
        if not layers and cross:
            raise ValueError(
                "update='output' pairs the original and the compressed model's inputs token by token "
                "through the decoder layers, but the model names none (model._no_split_modules)"
            )
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
        """Statistics the method reads (its table entry), plus X X^T for an update."""
        return METHODS[self.method].statistics | ({"H"} if self.update != "none" else frozenset())

    def on_sequential_epoch_end(self, state: State, event: Event, modules=None, **kwargs):
        if self._inputs is not None:
            self._compress_within_layer()
        else:
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
        if self._inputs is not None:
            self._inputs.release()
        self._collector = self._original = self._stream = self._inputs = None
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
        from llmcompressor.modifiers.utils.hooks import HooksMixin

        for layer in list(inputs.held):
            inside = set(layer.modules())
            for j, group in enumerate(g for g in groups if self._layers[g[0]] in inside):
                if j > 0:  # statistics again, with the groups before this one compressed
                    members = {self._layers[name] for name in group}
                    collector.release(members)
                    self._collecting = members
                    try:
                        with HooksMixin.disable_hooks(keep=self._stat_handles):
                            inputs.replay(layer)
                    finally:
                        self._collecting = None
                        collector.release_input()
                self._compress_ready(only=set(group))
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
            and n not in self._spectra
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
        S = None if self.update == "output" else self._weighting(original, name, whitened)
        W = layer.dense_weight  # (m, n), onloaded
        row_scale = self._row_scale.get(name)
        if self.allocation != "uniform":  # capped at the largest rank the allocation may choose
            factors = factorize(W, self._stored_rank(layer), S, row_scale, self._sigma)
            return factors, time.perf_counter() - start
        factors = self._fit(W, layer.rank, S, row_scale, stats, original)
        if self._rotate:
            factors.W_u, factors.W_v = rotate_factors(factors.W_u, factors.W_v)
        if UPDATES[self.update].cross:  # the update's own objective, for the record (owner rank)
            H, C, H_p = original.covariance(), stats.cross_covariance(), stats.covariance()
            objective = output_objective(W, factors.W_u, factors.W_v, H, C, H_p)
            self._objectives[name] = dict(
                objective=objective,
                rel_objective=objective / max(float((W.double() @ H * W.double()).sum()), 1e-300),
            )
        return factors, time.perf_counter() - start

    def _fit(self, W, k: int, S, row_scale, stats, original) -> Factors:
        """Rank-k factors of W: the method's weighted truncation, then the update.

        ``stats``: this layer's input statistics on the calibration stream (propagated when an
        update is on); ``original``: the original model's (the same object without an update).
        """
        if self.update == "output":  # S is unused: the fit whitens with the propagated H'
            S_p = self._whiten(stats.covariance(), "")
            return output_match(
                W, k, stats.cross_covariance(), stats.covariance(), S_p, self._sigma, damp=self.update_damp
            )
        factors = factorize(W, k, S, row_scale, self._sigma)
        if self.update == "input":  # stats are the propagated inputs here
            factors.W_u = refit_u(W, factors.W_v, stats.covariance(), damp=self.update_damp)
        elif self.update == "output_u":  # W_u W_v X' ~ W X with the truncation's W_v
            factors.W_u = refit_u(
                W, factors.W_v, stats.covariance(), damp=self.update_damp, C=stats.cross_covariance()
            )
        return factors

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
        if self.propagates:
            layer.activate()
        self._record(name, layer, factors, tokens, seconds, **self._objectives.pop(name, {}))

    def _stored_rank(self, layer: SVDLinear) -> int:
        """The largest rank the allocation can give this layer (what is kept until it runs)."""
        if self.allocation in ("loss", "global"):
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
        elif self.allocation == "global":
            ranks = allocate_global(matrices, uniform, self.rank_multiple, LOSS_SPREAD)
        elif self.allocation == "v2":
            ranks = allocate_v2(matrices, uniform, self._ratio, self.rank_multiple, scale=self._tokens)
        else:
            target = sum(m.m * m.n - params_of(m.m, m.n, uniform[m.name]) for m in matrices)
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
            if self._rotate:
                factors.W_u, factors.W_v = rotate_factors(factors.W_u, factors.W_v)
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
            weighting = METHODS[self.method].weighting
            if weighting == "none":  # plain SVD; FWSVD weights rows, not inputs
                cache[key] = None
            elif weighting == "channel":
                stat = (
                    stats.abs_sum / max(stats.tokens, 1)
                    if self.asvd_statistic == "abs_mean"
                    else stats.abs_max
                )
                cache[key] = stat.clamp_min(1e-6) ** self.asvd_alpha  # (n,)
            else:
                cache[key] = self._whiten(stats.covariance(), name)
        return cache[key]

    def _whiten(self, H: torch.Tensor, name: str) -> torch.Tensor:
        return whiten_eigh(H) if self.whitening == "eigh" else whiten_cholesky(H, name)

    def _record(self, name: str, layer: SVDLinear, factors, tokens: int, seconds: float, **extra) -> None:
        m, n, k = layer.out_features, layer.in_features, layer.rank
        total = float((factors.sigma.to(torch.float64) ** 2).sum())
        record = dict(
            name=name,
            m=m,
            n=n,
            rank=k,
            params_before=m * n,
            params_after=params_of(m, n, k),
            loss=factors.loss,
            rel_loss=factors.loss / total if total > 0 else 0.0,
            tokens=tokens,
            seconds=seconds,
            **extra,
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
    return max_rank(layer.out_features, layer.in_features)


def _inside_svd_linear(name: str) -> bool:
    return name.endswith((".svd_u", ".svd_v"))


def _check_group_sizes(modifier: Modifier, layers: dict[str, SVDLinear]) -> bool:
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
