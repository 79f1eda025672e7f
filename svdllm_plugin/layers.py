"""SVDLinear: a Linear replaced by two plain Linears, y = svd_u(svd_v(x)).

The children are ordinary ``nn.Linear`` so GPTQ, pruning and peft target them like any
other Linear; their names (``svd_u``, ``svd_v``) do not match ``*_proj`` patterns. The bias
of the original layer lives on ``svd_u``.

Until its factors are set, an SVDLinear is *pending*: it still computes the original dense
product (the dense weight is a non-persistent buffer, so it never reaches a checkpoint).
This lets a recipe build the factor structure at initialize time, so that modifiers
initialized after it (GPTQ) bind to the factors, while calibration still sees the
original layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from compressed_tensors.offload import disable_onloading
from torch import nn

from svdllm_plugin.offload import is_offloaded, offload_like, stored, write_parameter

__all__ = ["SVDLinear", "CompensatedLinear", "replace_module", "factorized_ranks", "compensated_ranks"]


class SVDLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"SVDLinear rank must be a positive integer; got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.svd_v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)  # (k, n)
        self.svd_u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)  # (m, k)
        self.register_buffer("dense_weight", None, persistent=False)

    @property
    def rank(self) -> int:
        return self.svd_v.out_features

    @property
    def pending(self) -> bool:
        """True while the layer still computes with its original dense weight."""
        buffers = self._buffers
        return getattr(buffers, "offloaded_values", buffers).get("dense_weight") is not None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "SVDLinear":
        """A pending SVDLinear that keeps computing ``linear`` until ``set_factors``.

        An offloaded ``linear`` gives an SVDLinear offloaded the same way: its dense weight is
        the linear's stored copy (no copy, no read), its placeholder factors are offloaded.
        """
        W = stored(linear, "weight")  # (m, n); a meta tensor when offloaded to disk
        device = W.device if W.device.type != "meta" else torch.device("cpu")
        with torch.device("meta"):  # no random init of placeholder factors
            layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, dtype=W.dtype)
        layer.to_empty(device=device)
        # in-place writes are safe here: ``layer`` is new and not offloaded yet (offload_like
        # below offloads these very tensors); reading ``linear.bias`` may onload a copy, which is fine
        for child in (layer.svd_u, layer.svd_v):
            nn.init.zeros_(child.weight)
        if linear.bias is not None:
            layer.svd_u.bias.data.copy_(linear.bias.detach())  # safe: `layer` is not offloaded yet (above)
        offload_like(layer, linear)
        with disable_onloading():  # hand over the stored tensor itself (the offload index keys on it)
            layer._buffers["dense_weight"] = W if is_offloaded(linear) else W.detach()
        return layer

    def set_factors(self, W_u: torch.Tensor, W_v: torch.Tensor) -> None:
        """Write W_u (m, k) and W_v (k, n); a new k resizes the children in place.

        The child modules keep their identity, so any modifier that has already bound
        them (GPTQ's module table, a hook) still refers to the right objects. Writes go
        through the offloading API, so they reach an offloaded (CPU / disk) copy.
        """
        k = W_v.shape[0]
        if W_u.shape != (self.out_features, k) or W_v.shape != (k, self.in_features):
            raise ValueError(
                f"factor shapes {tuple(W_u.shape)} x {tuple(W_v.shape)} do not fit "
                f"a ({self.out_features}, {self.in_features}) layer"
            )
        resized = k != self.rank
        write_parameter(self.svd_v, "weight", W_v)
        write_parameter(self.svd_u, "weight", W_u)
        self.svd_v.out_features = self.svd_u.in_features = k
        if resized:
            _reinitialize_quantization(self.svd_u, self.svd_v)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_u (m, k), W_v (k, n)) as stored now (onloaded copies when offloaded)."""
        return self.svd_u.weight.detach(), self.svd_v.weight.detach()

    def activate(self) -> None:
        """Switch from the dense weight to the factors (drops the dense weight)."""
        if "dense_weight" in self._buffers:
            # `del`, not `= None`: compressed-tensors' offload cache rejects None values
            del self._buffers["dense_weight"]

    def dense(self) -> torch.Tensor:
        """W' = W_u W_v (m, n), or the dense weight while pending."""
        if self.pending:
            return self.dense_weight
        return self.svd_u.weight @ self.svd_v.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pending:
            return F.linear(x, self.dense_weight, self.svd_u.bias)
        return self.svd_u(self.svd_v(x))

    def extra_repr(self) -> str:
        state = ", pending" if self.pending else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{state}"


def _reinitialize_quantization(*modules: nn.Module) -> None:
    """A quantization scheme bound at initialize sized its scales for the old rank."""
    for module in modules:
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None:
            from compressed_tensors.quantization.lifecycle.initialize import (
                initialize_module_for_quantization,
            )

            initialize_module_for_quantization(module, scheme)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def factorized_ranks(model: nn.Module) -> dict[str, int]:
    """{module name: rank} of every SVDLinear in ``model``."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, SVDLinear)}


class CompensatedLinear(nn.Module):
    """y = base(x) + lowrank_l(lowrank_r(x)): a (quantized) Linear plus a low-rank correction.

    ``base`` is the original Linear object itself (quantized in place by GPTQ; compressed-tensors
    packs it at save like any Linear); ``lowrank_r`` (r x in) and ``lowrank_l`` (out x r) are
    plain Linears without bias fitted to its quantization error. The names match no
    ``*_proj`` pattern.
    """

    def __init__(self, base: nn.Linear, rank: int, device=None, dtype=None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"CompensatedLinear rank must be a positive integer; got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base = base
        self.lowrank_r = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)  # (r, n)
        self.lowrank_l = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)  # (m, r)

    @property
    def rank(self) -> int:
        return self.lowrank_r.out_features

    @classmethod
    def from_linear(cls, base: nn.Linear, L: torch.Tensor, R: torch.Tensor) -> "CompensatedLinear":
        """Wrap ``base`` (kept as is) with factors L (m, r), R (r, n), offloaded like ``base``."""
        W = stored(base, "weight")  # (m, n); meta when offloaded to disk
        device = W.device if W.device.type != "meta" else torch.device("cpu")
        layer = cls(base, R.shape[0], device="meta", dtype=W.dtype)  # no init of the factors
        for child in (layer.lowrank_r, layer.lowrank_l):
            child.to_empty(device=device)
        # safe: the children are new and not offloaded yet (offload_like below offloads them)
        layer.lowrank_r.weight.data.copy_(R.to(W.dtype))  # safe: new child, not offloaded yet
        layer.lowrank_l.weight.data.copy_(L.to(W.dtype))  # safe: new child, not offloaded yet
        for child in (layer.lowrank_r, layer.lowrank_l):
            offload_like(child, base)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lowrank_l(self.lowrank_r(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def compensated_ranks(model: nn.Module) -> dict[str, int]:
    """{module name: rank} of every CompensatedLinear in ``model``."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, CompensatedLinear)}
