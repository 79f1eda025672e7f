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
- on_calibration_end: switch every layer to its factors, check nothing was missed.
"""

from __future__ import annotations

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
from svdllm_plugin.modifiers.svd.decompose import (
    factorize,
    rank_for_ratio,
    saves_parameters,
    whiten_cholesky,
    whiten_eigh,
)
from svdllm_plugin.modifiers.svd.statistics import StatisticsCollector

__all__ = ["SVDLLMModifier"]

Method = Literal["svd_llm", "svd_llm_v2", "svd", "asvd"]


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

    _layers: dict[str, SVDLinear] = PrivateAttr(default_factory=dict)
    _collector: StatisticsCollector | None = PrivateAttr(default=None)
    _records: list[dict] = PrivateAttr(default_factory=list)
    _kept_dense: list[str] = PrivateAttr(default_factory=list)

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
    def _check_method(self):
        if self.method == "svd_llm_v2":
            self.whitening = "eigh"
        return self

    # ---- lifecycle ------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        matched = [
            (name, module)
            for name, module in match_named_modules(model, self.targets, self.ignore)
            if isinstance(module, nn.Linear) and not _inside_svd_linear(name)
        ]
        if not matched:
            raise ValueError(
                f"SVDLLMModifier found no Linear modules matching targets={self.targets} "
                f"(ignore={self.ignore}). Please check `targets` in the recipe."
            )
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
            raise ValueError(
                f"SVDLLMModifier: none of the {len(matched)} matched matrices saves parameters "
                f"at ratio={self.ratio}; raise `ratio`"
            )
        logger.info(
            "SVDLLMModifier: {} Linears to factorize ({} kept dense), method={}, ratio={}",
            len(self._layers), len(self._kept_dense), self.method, self.ratio,
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        self._collector = StatisticsCollector(names={m: n for n, m in self._layers.items()})
        for layer in self._layers.values():
            if layer.pending:
                self.register_hook(layer, self._collector, "forward_pre")

    def on_sequential_epoch_end(self, state: State, event: Event, modules=None, **kwargs):
        self._compress_ready()

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._compress_ready()
        self.remove_hooks()
        missed = [name for name, layer in self._layers.items() if name not in self._done]
        if missed:
            raise RuntimeError(
                f"Failed to compress {len(missed)} modules that saw no calibration data: "
                f"{missed[:5]}... Check that they run in the model's forward."
            )
        for layer in self._layers.values():
            layer.activate()
        self._collector = None

    def on_finalize(self, state: State, **kwargs) -> bool:
        if self._records:
            before = sum(r["params_before"] for r in self._records)
            after = sum(r["params_after"] for r in self._records)
            logger.info(
                "SVDLLMModifier: {} modules, targeted parameters {:,} -> {:,} ({:.1%} removed)",
                len(self._records), before, after, 1 - after / before,
            )
        return True

    # ---- work -----------------------------------------------------------------------
    @property
    def _done(self) -> set[str]:
        return {r["name"] for r in self._records}

    @property
    def records(self) -> list[dict]:
        """One dict per compressed module: name, shape, rank, loss, time."""
        return list(self._records)

    def _compress_ready(self) -> None:
        """Decompose every pending layer whose statistics are complete (its layer ran)."""
        collector = self._collector
        if collector is None:
            return
        ready = [(n, l) for n, l in self._layers.items() if n not in self._done and collector.get(l)]
        whitened: dict[int, tuple] = {}  # one whitening per shared input
        for name, layer in ready:
            stats = collector.get(layer)
            start = time.perf_counter()
            S, S_inv = self._weighting(stats, name, whitened)
            W = layer.dense_weight  # (m, n)
            factors = factorize(W, layer.rank, S, S_inv, sigma_on=self.sigma)
            layer.set_factors(factors.W_u, factors.W_v)
            if self.activations == "propagated":
                layer.activate()
            self._record(name, layer, factors, stats.tokens, time.perf_counter() - start)
        collector.release(layer for _, layer in ready)

    def _weighting(self, stats, name: str, cache: dict) -> tuple:
        """(S, S^{-1}) of the method; cached per statistics object (shared inputs)."""
        key = id(stats)
        if key not in cache:
            if self.method == "svd":
                cache[key] = (None, None)
            elif self.method == "asvd":
                stat = stats.abs_sum / max(stats.tokens, 1) if self.asvd_statistic == "abs_mean" else stats.abs_max
                s = stat.clamp_min(1e-6) ** self.asvd_alpha  # (n,)
                cache[key] = (torch.diag(s), torch.diag(1.0 / s))
            elif self.whitening == "eigh":
                cache[key] = whiten_eigh(stats.covariance())
            else:
                cache[key] = whiten_cholesky(stats.covariance(), name)
        return cache[key]

    def _record(self, name: str, layer: SVDLinear, factors, tokens: int, seconds: float) -> None:
        m, n, k = layer.out_features, layer.in_features, layer.rank
        total = float((factors.sigma.to(torch.float64) ** 2).sum())
        record = dict(
            name=name, m=m, n=n, rank=k, params_before=m * n, params_after=k * (m + n),
            loss=factors.loss, rel_loss=factors.loss / total if total > 0 else 0.0,
            tokens=tokens, seconds=seconds,
        )
        self._records.append(record)
        logger.info(
            "{} ({}x{}) rank {} | params -{:.1%} | truncation loss {:.4g} (rel {:.2e}) | "
            "{} tokens | {:.2f}s",
            name, m, n, k, 1 - record["params_after"] / record["params_before"],
            record["loss"], record["rel_loss"], tokens, seconds,
        )

    def _ratio_for(self, name: str) -> float:
        for pattern, ratio in self.overrides.items():
            if _matches(name, pattern):
                return ratio
        return self.ratio


def _matches(name: str, pattern: str) -> bool:
    import re

    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _inside_svd_linear(name: str) -> bool:
    return name.endswith((".svd_u", ".svd_v"))
