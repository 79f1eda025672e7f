"""What each compressed Linear reports: one record (and one log line) per module."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from loguru import logger

from svdllm_plugin.modifiers.svd.decompose import Factors, params_of

__all__ = ["LayerRecord", "log_summary"]


@dataclass(frozen=True)
class LayerRecord:
    """One compressed Linear: shape (m, n), rank, parameters, whitened truncation loss, cost."""

    name: str
    m: int
    n: int
    rank: int
    params_before: int
    params_after: int
    loss: float  # sum of the discarded sigma_i^2
    rel_loss: float  # loss / sum of all sigma_i^2
    tokens: int
    seconds: float
    extra: dict = field(default_factory=dict)  # e.g. an update's objective and rel_objective

    @classmethod
    def of(cls, name: str, layer, factors: Factors, tokens: int, seconds: float, **extra) -> LayerRecord:
        """The record of ``layer`` (an ``SVDLinear``) with these factors."""
        m, n, k = layer.out_features, layer.in_features, layer.rank
        total = float((factors.sigma.to(torch.float64) ** 2).sum())
        rel_loss = factors.loss / total if total > 0 else 0.0
        return cls(name, m, n, k, m * n, params_of(m, n, k), factors.loss, rel_loss, tokens, seconds, extra)

    def as_dict(self) -> dict:
        """The record as ``SVDLLMModifier.records`` lists it (``extra`` flattened in)."""
        record = asdict(self)
        extra = record.pop("extra")
        return {**record, **extra}

    def log(self) -> None:
        logger.info(
            "{} ({}x{}) rank {} | params -{:.1%} | truncation loss {:.4g} (rel {:.2e}) | {} tokens | {:.2f}s",
            self.name,
            self.m,
            self.n,
            self.rank,
            1 - self.params_after / self.params_before,
            self.loss,
            self.rel_loss,
            self.tokens,
            self.seconds,
        )


def log_summary(records: list[LayerRecord]) -> None:
    """The modifier's last line: targeted parameters before and after."""
    if not records:
        return
    before = sum(r.params_before for r in records)
    after = sum(r.params_after for r in records)
    logger.info(
        "SVDLLMModifier: {} modules, targeted parameters {:,} -> {:,} ({:.1%} removed)",
        len(records),
        before,
        after,
        1 - after / before,
    )
