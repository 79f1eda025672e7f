"""Fused shared-input factors: one GEMM over the concatenated W_v of Linears that read the same input.

q/k/v read the same hidden states, and so do gate/up. Factorized, each computes
``svd_u(svd_v(x))``: three small GEMMs with the same left operand. Stacking their W_v
(k_i, n) into one (sum k_i, n) matrix turns them into one GEMM whose output is sliced per
member, each slice then going through its own ``svd_u``. A member kept dense joins the same
GEMM with its full weight (its slice is already the output; its bias is added after).

Only torch is imported: this file can be copied into a checkpoint folder next to a
``modeling_*.py`` (modules are recognised by duck typing: children named ``svd_u``/``svd_v``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_GROUPS", "SharedInputGemm", "FusedMember", "fuse_shared_inputs", "is_factorized"]

# names of sibling Linears that the usual decoder layers call on the same input
DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def is_factorized(module: nn.Module) -> bool:
    """A layer computing ``svd_u(svd_v(x))`` with plain Linear children (the plugin's SVDLinear)."""
    return isinstance(getattr(module, "svd_u", None), nn.Linear) and isinstance(
        getattr(module, "svd_v", None), nn.Linear
    )


class SharedInputGemm(nn.Module):
    """``x @ W^T`` for the stacked input weights of a group; the last result is reused.

    Members call it one after another with the same tensor; the product is computed on the
    first call and handed out until every member has taken its slice (then it is dropped, so
    no activation outlives the layer's forward).
    """

    def __init__(self, weight: torch.Tensor, members: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (sum k_i, n)
        self.members = members
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._taken = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._x:
            self._x, self._y, self._taken = x, F.linear(x, self.weight), 0
        y = self._y
        self._taken += 1
        if self._taken >= self.members:
            self._x = self._y = None
        return y

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, members={self.members}"


class FusedMember(nn.Module):
    """One member of a fused group: its slice of the shared product, then ``svd_u`` (or its bias)."""

    def __init__(self, gemm: SharedInputGemm, start: int, end: int, svd_u: nn.Linear | None, bias):
        super().__init__()
        self.__dict__["gemm"] = gemm  # owned (registered) by the parent module, not by each member
        self.start, self.end = start, end
        if svd_u is not None:
            self.svd_u = svd_u
            self.out_features = svd_u.out_features
        else:
            self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
            self.out_features = end - start
        self.in_features = gemm.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gemm(x)[..., self.start : self.end]
        if hasattr(self, "svd_u"):
            return self.svd_u(y)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        kind = f"rank={self.end - self.start}" if hasattr(self, "svd_u") else "dense"
        return f"slice=[{self.start}:{self.end}], {kind}, out_features={self.out_features}"


def _input_weight(module: nn.Module) -> tuple[torch.Tensor, nn.Linear | None, torch.Tensor | None]:
    if is_factorized(module):
        return module.svd_v.weight.detach(), module.svd_u, None
    return module.weight.detach(), None, module.bias


def _has_float_weight(linear: nn.Module) -> bool:
    """False for a packed quantized Linear (compressed-tensors replaced ``weight`` by ``weight_packed``):
    its stored integers cannot join a float GEMM, so its group stays unfused."""
    weight = linear._parameters.get("weight")
    return weight is not None and weight.is_floating_point()


def _fusable(module) -> bool:
    if is_factorized(module):
        return (
            module.svd_v.bias is None
            and not getattr(module, "pending", False)
            and _has_float_weight(module.svd_v)
        )
    return type(module) is nn.Linear and _has_float_weight(module)


def fuse_shared_inputs(
    model: nn.Module, groups: tuple[tuple[str, ...], ...] = DEFAULT_GROUPS, dense_groups: bool = False
) -> nn.Module:
    """Fuse, in place, every group of sibling Linears that read the same input; returns ``model``.

    A group is fused when all its members exist and at least one is factorized (with
    ``dense_groups=True`` all-dense groups are fused too). The group's GEMM is registered on
    the parent module as ``<first>_<last>_in`` (e.g. ``q_proj_v_proj_in``); each member
    keeps its name and its ``svd_u`` child, so hooks and the latent KV cache still find it.
    The fused model computes the same function up to float rounding; it is for inference
    (the stacked weight is a new tensor: the members' old ``svd_v`` weights are released).
    Groups with packed quantized members (a W4/W3 folder loaded by transformers) are left as
    they are: their quantized kernels already read the weights once per member.
    """
    fused = 0
    for parent in list(model.modules()):
        for names in groups:
            members = [getattr(parent, name, None) for name in names]
            if any(m is None or not _fusable(m) for m in members):
                continue
            if not dense_groups and not any(is_factorized(m) for m in members):
                continue
            parts = [_input_weight(m) for m in members]
            weight = torch.cat([w for w, _, _ in parts], dim=0).contiguous()
            gemm = SharedInputGemm(weight, len(members))
            parent.add_module(f"{names[0]}_{names[-1]}_in", gemm)
            start = 0
            for name, (w, svd_u, bias) in zip(names, parts):
                end = start + w.shape[0]
                setattr(parent, name, FusedMember(gemm, start, end, svd_u, bias))
                start = end
            fused += 1
    model._svdllm_fused_groups = fused
    return model
