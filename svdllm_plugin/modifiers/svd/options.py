"""SVDLLMModifier's settings: the recipe keys, their types and the checks that run at parse time.

Each single-field rule is an ``Annotated`` type (its message names the field and the fix);
rules that relate fields to each other are ``_check_combination``. What the string options
select lives in tables: ``METHODS`` / ``UPDATES`` (``fit.py``), ``ALLOCATIONS`` (``ranks.py``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from llmcompressor.modifiers import Modifier
from pydantic import AfterValidator, Field, model_validator

from svdllm_plugin.modifiers.checks import Modules, PositiveInt
from svdllm_plugin.modifiers.svd.fit import METHODS, UPDATES

__all__ = ["SVDLLMOptions", "Method", "Update", "Allocation"]

Method = Literal["svd_llm", "svd_llm_v2", "svd", "asvd", "fwsvd"]
Update = Literal["none", "input", "output", "output_u"]
Allocation = Literal["uniform", "loss", "v2", "global", "sensitivity"]


def _ratio(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"`ratio` is the fraction of each matrix's parameters removed and must be in "
            f"(0, 1), e.g. 0.2; got {value}"
        )
    return value


def _model_ratio(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError(f"`model_ratio` is the fraction of the whole model removed, in (0, 1); got {value}")
    return value


def _overrides(value: dict[str, float]) -> dict[str, float]:
    for pattern, ratio in value.items():
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"`overrides[{pattern!r}]` must be a ratio in (0, 1); got {ratio}")
    return value


def _candidates(value: list[float]) -> list[float]:
    if not value or not all(0.0 < r < 1.0 for r in value):
        raise ValueError(f"`sensitivity_ratios` must be ratios in (0, 1); got {value}")
    return sorted(value)


Ratio = Annotated[float, AfterValidator(_ratio)]
ModelRatio = Annotated[float, AfterValidator(_model_ratio)]
Overrides = Annotated[dict[str, float], AfterValidator(_overrides)]
Candidates = Annotated[list[float], AfterValidator(_candidates)]


class SVDLLMOptions(Modifier):
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

    targets: Modules = Field(default_factory=lambda: ["Linear"])
    ignore: Modules = Field(default_factory=lambda: ["re:.*lm_head"])
    ratio: Ratio = 0.2
    overrides: Overrides = Field(default_factory=dict)
    method: Method = "svd_llm"
    whitening: Literal["cholesky", "eigh"] = "cholesky"
    rank_multiple: PositiveInt = 1
    sigma: Literal["auto", "split", "u", "v"] = "auto"
    rotation: Literal["auto", "none", "random"] = "auto"
    activations: Literal["original", "propagated"] = "original"
    asvd_alpha: float = 0.5
    asvd_statistic: Literal["abs_mean", "abs_max"] = "abs_mean"
    model_ratio: ModelRatio | None = None
    allocation: Allocation = "uniform"
    row_weighting: Literal["none", "fisher"] = "none"
    update: Update = "none"
    update_damp: float = 1e-6
    intra_layer: bool = False
    closed_form_update: bool = False
    fisher_batches: PositiveInt = 8
    sensitivity_ratios: Candidates = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    sensitivity_batches: PositiveInt = 2

    @model_validator(mode="after")
    def _check_combination(self):
        spec = METHODS[self.method]
        if spec.whitening is not None:
            self.whitening = spec.whitening
        if self.closed_form_update and self.update == "none":
            self.update = "input"
        self.closed_form_update = self.update != "none"  # the legacy key, as saved recipes read it
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
        """Whether calibration must see the compressed model's outputs (error propagation on):
        False means one pass per decoder layer is enough (``compress.single_pass`` reads it)."""
        return self.activations == "propagated" or UPDATES[self.update].propagated
