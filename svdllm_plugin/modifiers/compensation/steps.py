"""The steps of LowRankCompensationModifier that touch modules, schemes or processes.

- ``alternate``: CALDERA-style rounds, Q = GPTQ(W - L R) with the first quantization's scales,
  then the whitened refit of L R to W - Q; the best round is kept.
- ``attach_factor_schemes``: compressed-tensors schemes and scales for integer factors, so the
  save packs them.
- ``sum_over_ranks`` / ``same_on_all_ranks``: under torchrun every rank holds the summed X X^T
  and rank 0's factors (no-ops otherwise).
"""

from __future__ import annotations

import torch
from loguru import logger
from torch import nn

from svdllm_plugin import distributed
from svdllm_plugin.layers import CompensatedLinear
from svdllm_plugin.modifiers.compensation import fit
from svdllm_plugin.offload import write_parameter

__all__ = [
    "log_record",
    "log_summary",
    "weight_scheme",
    "alternate",
    "requantize",
    "attach_factor_schemes",
    "sum_over_ranks",
    "same_on_all_ranks",
]


def alternate(linear: nn.Linear, W: torch.Tensor, E, L, R, H: torch.Tensor, S: torch.Tensor, rounds: int):
    """Rounds 2..``rounds``: Q = GPTQ(W - L R), refit L R (rank fixed) to W - Q. The round of the
    lowest ||(W - Q - L R) X|| is kept and its Q written back. Returns (E = W - Q, L, R)."""
    r = R.shape[0]
    best = (fit.objective(E, H, L, R), linear.weight.detach().clone(), E, L, R)
    for _ in range(1, rounds):
        E = requantize(linear, W, L, R, H)
        L, R = fit.truncate(fit.fit_error(E, S, r), r)
        objective = fit.objective(E, H, L, R)
        if objective < best[0]:
            best = (objective, linear.weight.detach().clone(), E, L, R)
    write_parameter(linear, "weight", best[1])
    return best[2:]


def requantize(linear: nn.Linear, W: torch.Tensor, L, R, H: torch.Tensor) -> torch.Tensor:
    """GPTQ of W - L R (m, n) with the module's own scales; writes Q_new, returns W - Q_new."""
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    W = W.to(torch.float64)
    target = (W - L.to(W.device, torch.float64) @ R.to(W.device, torch.float64)).to(linear.weight.dtype)
    scale = linear.weight_scale.detach()
    zero_point = getattr(linear, "weight_zero_point", None)
    zero_point = zero_point.detach() if zero_point is not None else torch.zeros_like(scale)
    quantized, _, _ = quantize_weight(
        weights=target[None].to(scale.device),
        hessians=(2 * H).to(scale.device, torch.float32)[None],  # GPTQ's H = 2 X X^T / tokens
        scale=scale[None],
        zero_point=zero_point[None],
        global_scale=None,
        quant_args=weight_scheme(linear),
    )
    write_parameter(linear, "weight", quantized[0])
    return W - linear.weight.detach().to(torch.float64).cpu()


def weight_scheme(module: nn.Module):
    """The weight QuantizationArgs a quantization modifier attached to ``module`` (or None)."""
    scheme = getattr(module, "quantization_scheme", None)
    return getattr(scheme, "weights", None) if scheme is not None else None


def sum_over_ranks(statistics) -> None:
    """Under torchrun: every rank gets the sums of X X^T and token counts (no-op otherwise)."""
    if not distributed.is_distributed():
        return
    for stats in statistics:
        tokens = torch.tensor([float(stats.tokens)], dtype=torch.float64)
        distributed.sum_over_ranks({"H": stats.H, "tokens": tokens})
        stats.tokens = int(tokens.item())


def same_on_all_ranks(L: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under torchrun: rank 0's factors on every rank (each computed them from the same sums)."""
    if not distributed.is_distributed():
        return L, R
    import torch.distributed as dist

    L, R = L.contiguous().clone(), R.contiguous().clone()
    for tensor in (L, R):
        distributed._comm(dist.broadcast, tensor, src=0)
    return L, R


def attach_factor_schemes(layer: CompensatedLinear, bits: int, group_size: int, scale_L, scale_R) -> None:
    """Give the rounded factors compressed-tensors schemes and their scales, so the save packs them.

    ``lowrank_r``: groups of ``group_size`` input columns (one per row if it does not divide);
    ``lowrank_l``: one scale per row. The regex targets outrank the quantizer's ``Linear`` class
    target when transformers' compressed-tensors quantizer reloads the folder.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    n = layer.in_features
    for child, suffix, scale, strategy in (
        (layer.lowrank_r, "lowrank_r", scale_R, "group" if n % group_size == 0 else "channel"),
        (layer.lowrank_l, "lowrank_l", scale_L, "channel"),
    ):
        args = dict(num_bits=bits, type="int", symmetric=True, strategy=strategy)
        if strategy == "group":
            args["group_size"] = group_size
        scheme = QuantizationScheme(targets=[rf"re:.*\.{suffix}$"], weights=QuantizationArgs(**args))
        initialize_module_for_quantization(child, scheme)
        write_parameter(child, "weight_scale", scale.reshape(child.weight_scale.shape))
        child.quantization_status = QuantizationStatus.FROZEN


def log_record(record: dict, seconds: float) -> None:
    """One line per module: rank, whitened error before -> after, extra bits per weight, time."""
    logger.info(
        "{}: rank {}, whitened error {:.4g} -> {:.4g} ({:.1%}), {:.3f} extra bits/weight, {:.2f}s",
        record["name"],
        record["rank"],
        record["objective_q"],
        record["objective"],
        record["objective"] / max(record["objective_q"], 1e-300),
        record["bits"] / (record["m"] * record["n"]),
        seconds,
    )


def log_summary(records: list[dict]) -> None:
    if not records:
        return
    logger.info(
        "LowRankCompensationModifier: {} modules, whitened error {:.4g} -> {:.4g}, {:.3f} extra bits "
        "per weight",
        len(records),
        sum(r["objective_q"] for r in records),
        sum(r["objective"] for r in records),
        sum(r["bits"] for r in records) / sum(r["m"] * r["n"] for r in records),
    )
