"""Test-only helpers for factorized and quantized models (not part of the package)."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import torch
from torch import nn

from svdllm_plugin.layers import SVDLinear, replace_module


def max_distinct_per_group(W: torch.Tensor, group_size: int) -> int:
    """Largest number of distinct values in any group of ``group_size`` consecutive columns."""
    groups = W.reshape(-1, group_size).sort(dim=1).values  # (m * n / g, g)
    return int(((groups[:, 1:] != groups[:, :-1]).sum(dim=1) + 1).max())


def factorize(model: nn.Module, rank: int, targets: tuple[str, ...]) -> nn.Module:
    """Plain truncated SVD of the Linears whose names end with ``targets`` (no calibration)."""
    for name, module in list(model.named_modules()):
        if name.endswith(targets) and isinstance(module, nn.Linear):
            U, S, Vh = torch.linalg.svd(module.weight.data, full_matrices=False)
            layer = SVDLinear.from_linear(module, rank)
            layer.set_factors(U[:, :rank] * S[:rank].sqrt(), S[:rank].sqrt()[:, None] * Vh[:rank])
            layer.activate()
            replace_module(model, name, layer)
    return model


def saved_and_reloaded(model: nn.Module, folder: Path, tokenizer) -> nn.Module:
    """``model`` saved with ``tokenizer`` to ``folder`` and loaded back (oneshot re-reads the
    config and processor from ``config.name_or_path``)."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


FACTORIZED = ("q_proj", "o_proj", "up_proj", "down_proj")
RANK = 64  # a multiple of the group size, so svd_u's input splits into whole groups


def factor_model(tiny_factory, tokenizer, folder: Path) -> nn.Module:
    """The hidden-128 tiny Llama, saved to ``folder`` and reloaded, with FACTORIZED as SVDLinear."""
    return factorize(saved_and_reloaded(tiny_factory(hidden=128), folder, tokenizer), RANK, FACTORIZED)


def factorize_ratio(model: nn.Module, ratio: float = 0.4, keep_dense: tuple[str, ...] = ()) -> nn.Module:
    """Plain truncated SVD of every decoder Linear at ``ratio`` (no calibration: runtime tests
    only need the shapes); names ending with ``keep_dense`` stay dense."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    for name in names:
        if any(name.endswith(k) for k in keep_dense):
            continue
        linear = model.get_submodule(name)
        m, n = linear.weight.shape
        k = int(m * n * (1 - ratio) / (m + n))
        U, S, Vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
        layer = SVDLinear.from_linear(linear, k)
        layer.set_factors(U[:, :k] * S[:k].sqrt(), S[:k].sqrt()[:, None] * Vh[:k])
        layer.activate()
        replace_module(model, name, layer)
    return model.eval()


def held_numel(value, seen=None) -> int:
    """Elements of every tensor reachable through dicts, lists, tuples, dataclasses and the
    attributes of plain objects (``LayerInputs``, ``OriginalStream``); not through modules."""
    seen = set() if seen is None else seen
    if id(value) in seen or isinstance(value, (nn.Module, type, types.FunctionType, types.MethodType)):
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, dict):
        return sum(held_numel(k, seen) + held_numel(v, seen) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return sum(held_numel(v, seen) for v in value)
    if dataclasses.is_dataclass(value):
        return sum(held_numel(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    if hasattr(value, "__dict__") and type(value).__module__.startswith("svdllm_plugin"):
        return held_numel(vars(value), seen)
    return 0


def held_after_each_layer(model: nn.Module, calib, modifier) -> list[int]:
    """Run ``modifier`` through oneshot; after each decoder layer's epoch, the number of tensor
    elements the modifier's private state holds."""
    from support import run_oneshot

    cls = type(modifier)
    held: list[int] = []
    epoch_end = cls.on_sequential_epoch_end

    def spy(self, *args, **kwargs):
        epoch_end(self, *args, **kwargs)
        held.append(held_numel(list(self.__pydantic_private__.values())))

    cls.on_sequential_epoch_end = spy
    try:
        run_oneshot(model, calib, modifier)
    finally:
        cls.on_sequential_epoch_end = epoch_end
    return held


def greedy(model, prompt, steps, cache):
    """Token-by-token greedy decoding; returns (tokens, logits of every step)."""
    tokens, logits = prompt, []
    with torch.no_grad():
        out = model(prompt, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            out = model(nxt, past_key_values=cache, use_cache=True)
    return tokens, torch.stack(logits, 1)
