"""Factorized projections as vLLM linear layers, split for tensor parallelism with exact math.

A compressed folder stores each factorized Linear W (m x n) as ``svd_v`` (k x n) and ``svd_u``
(m x k, with W's bias): y = W_u (W_v x). Tensor parallelism splits the pair so that no rank
needs another's partial rank-k vector before the all-reduce vLLM already does:

- column-parallel projections (q/k/v, gate/up): ``svd_v`` replicated (every rank computes the
  whole W_v x, k numbers per token), ``svd_u`` column-parallel (each rank its output rows);
- row-parallel projections (o, down): ``svd_v`` row-parallel over the sharded input, its partial
  products all-reduced into W_v x, then ``svd_u`` replicated (bias once).

Each factor is an ordinary vLLM linear layer, so a compressed-tensors quantization config binds
to ``...q_proj.svd_u`` like to any other Linear (vLLM picks the kernel for the device).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear

COLUMN, ROW = "column", "row"

__all__ = ["COLUMN", "ROW", "FactorizedLinear", "projection"]


class FactorizedLinear(nn.Module):
    """y = svd_u(svd_v(x)) with the tensor-parallel split of a ``parallel`` ("column"/"row") Linear."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        parallel: str,
        quant_config=None,
        prefix: str = "",
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        if parallel == COLUMN:
            self.svd_v = ReplicatedLinear(  # (k, n) on every rank
                in_features,
                rank,
                bias=False,
                quant_config=quant_config,
                prefix=f"{prefix}.svd_v",
                return_bias=False,
            )
            self.svd_u = ColumnParallelLinear(  # (m / tp, k): this rank's output rows
                rank,
                out_features,
                bias=bias,
                quant_config=quant_config,
                prefix=f"{prefix}.svd_u",
                return_bias=False,
            )
        elif parallel == ROW:
            self.svd_v = RowParallelLinear(  # (k, n / tp): partial W_v x, all-reduced
                in_features,
                rank,
                bias=False,
                input_is_parallel=True,
                reduce_results=True,
                quant_config=quant_config,
                prefix=f"{prefix}.svd_v",
                return_bias=False,
            )
            self.svd_u = ReplicatedLinear(  # (m, k) on every rank, bias added once
                rank,
                out_features,
                bias=bias,
                quant_config=quant_config,
                prefix=f"{prefix}.svd_u",
                return_bias=False,
            )
        else:
            raise ValueError(f"parallel must be {COLUMN!r} or {ROW!r}; got {parallel!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.svd_u(self.svd_v(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def projection(
    in_features: int,
    out_features: int,
    bias: bool,
    parallel: str,
    ranks: dict[str, int],
    quant_config=None,
    prefix: str = "",
) -> nn.Module:
    """The layer for checkpoint Linear ``prefix``: factorized if config.json lists its rank, else dense.

    Both return the output tensor alone (``return_bias=False``).
    """
    if prefix in ranks:
        return FactorizedLinear(
            in_features, out_features, ranks[prefix], bias, parallel, quant_config, prefix
        )
    if parallel == COLUMN:
        return ColumnParallelLinear(
            in_features, out_features, bias=bias, quant_config=quant_config, prefix=prefix, return_bias=False
        )
    return RowParallelLinear(
        in_features,
        out_features,
        bias=bias,
        input_is_parallel=True,
        quant_config=quant_config,
        prefix=prefix,
        return_bias=False,
    )
