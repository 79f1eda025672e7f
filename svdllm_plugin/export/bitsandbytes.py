"""bitsandbytes conversion of a loaded (dense-factor) model: NF4 / int8 for every Linear, factors included."""

from __future__ import annotations

import torch
from loguru import logger
from torch import nn

__all__ = ["to_bitsandbytes"]


def to_bitsandbytes(model: nn.Module, mode: str = "nf4", skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear (the SVD factors included) by a bitsandbytes NF4 / int8 one.

    transformers' ``BitsAndBytesConfig`` path cannot be used on a factorized checkpoint:
    it quantizes while loading into the dense architecture, before our SVDLinear swap.
    Converting the loaded model by hand gives the same modules and runs on CPU.
    """
    import bitsandbytes as bnb

    if mode not in ("nf4", "int8"):
        raise ValueError(f"mode must be 'nf4' or 'int8'; got {mode!r}")
    names = [
        n
        for n, m in model.named_modules()
        if type(m) is nn.Linear and not any(n == s or n.endswith("." + s) for s in skip)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _bnb_linear(getattr(parent, child), mode, bnb))
    logger.info("Converted {} Linears to bitsandbytes {}", len(names), mode)
    return model


def _bnb_linear(linear: nn.Linear, mode: str, bnb) -> nn.Module:
    """One bitsandbytes Linear holding ``linear``'s weights; quantized by the ``.to`` call."""
    if hasattr(linear, "quantization_scheme"):
        raise ValueError(
            "this Linear is already quantized by compressed-tensors; convert a dense factor model"
        )
    W, bias = linear.weight.data, linear.bias
    device = W.device
    with torch.device("meta"):  # skip allocating and initialising a weight we replace
        if mode == "nf4":
            new = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias is not None,
                compute_dtype=W.dtype,
                quant_type="nf4",
            )
        else:
            new = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias is not None,
                has_fp16_weights=False,
                threshold=0.0,
            )
    if mode == "nf4":
        new.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4", module=new)
    else:
        new.weight = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.data, requires_grad=False)
    return new.to(device)
