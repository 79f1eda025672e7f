"""OneshotMagnitudePruningModifier: magnitude pruning that prunes in ``oneshot``.

llmcompressor's ``MagnitudePruningModifier`` applies its masks on optimizer steps, so in a
oneshot run (no training) it leaves the weights untouched. This modifier zeroes the
smallest ``|w|`` once, at the end of its own calibration turn:

- ``unstructured``: the ``round(sparsity * n)`` smallest weights of every row (m, n).
- ``N:M``: ``N`` of every ``M`` consecutive weights along the input dim, llmcompressor's
  convention (SparseGPT, Wanda): ``2:4`` zeroes 2 of every 4, sparsity 0.5.

Lifecycle (llmcompressor calls these):
- on_initialize: check that ``targets`` match some Linear, so a typo fails before any
  calibration runs.
- on_calibration_end: resolve the targets again and prune. The modifier needs no data, so
  oneshot's default ``independent`` pipeline gives it its own data-free turn, after the
  turn of an earlier SVDLLMModifier (factors set and active): the targets are then the
  ``svd_u`` / ``svd_v`` factor Linears. A target that is still the child of a pending
  SVDLinear means SVDLLMModifier comes later in the recipe; that is refused.

The zeros are not protected afterwards: a later GPTQModifier moves them off zero. Put a
quantization modifier first if both are wanted (zero lies on every symmetric grid).
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn

from svdllm_plugin.layers import SVDLinear
from svdllm_plugin.offload import write_parameter

__all__ = ["OneshotMagnitudePruningModifier", "magnitude_mask", "parse_mask_structure"]


class OneshotMagnitudePruningModifier(Modifier):
    """Zero the smallest-magnitude weights of every targeted Linear, once, without data.

    :param sparsity: fraction of each weight set to zero, in (0, 1). With ``N:M`` it must
        be N / M (e.g. 0.5 for ``2:4``).
    :param mask_structure: ``unstructured`` (per row) or ``N:M`` (N of every M consecutive
        input weights zeroed).
    :param targets: modules to prune, llmcompressor matching style (class names or ``re:``
        patterns on module names). Default: every Linear, the SVD factors included.
    :param ignore: modules never pruned. Default: the (possibly tied) lm_head; embeddings
        are not Linear.
    """

    sparsity: float
    mask_structure: str = "unstructured"
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["re:.*lm_head"])

    _records: list[dict] = PrivateAttr(default_factory=list)

    # ---- validation -----------------------------------------------------------------
    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _as_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(
                f"`sparsity` is the fraction of weights zeroed and must be in (0, 1); got {value}"
            )
        return value

    @field_validator("mask_structure")
    @classmethod
    def _check_mask_structure(cls, value: str) -> str:
        parse_mask_structure(value)
        return value

    @model_validator(mode="after")
    def _check_combination(self):
        nm = parse_mask_structure(self.mask_structure)
        if nm is not None and abs(self.sparsity - nm[0] / nm[1]) > 1e-9:
            raise ValueError(
                f"mask_structure {self.mask_structure!r} zeroes {nm[0]} of every {nm[1]} weights, "
                f"sparsity {nm[0] / nm[1]:g}; got {self.sparsity}"
            )
        return self

    @property
    def records(self) -> list[dict]:
        """One dict per pruned module: name, shape, zeros, sparsity."""
        return list(self._records)

    # ---- lifecycle ------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        self._resolve(state.model)
        return True

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        modules = self._resolve(state.model)
        pending = [name for name, _ in modules if _pending_factor(state.model, name)]
        if pending:
            raise ValueError(
                f"OneshotMagnitudePruningModifier would prune {len(pending)} factors of SVDLinear layers "
                f"that SVDLLMModifier has not computed yet (e.g. {pending[0]}): put SVDLLMModifier "
                "before it in the recipe"
            )
        nm = parse_mask_structure(self.mask_structure)
        uneven = [(name, linear.in_features) for name, linear in modules if nm and linear.in_features % nm[1]]
        if uneven:  # checked before any module is pruned
            raise ValueError(
                f"{uneven[0][0]}: mask_structure {self.mask_structure!r} needs an input width that is a "
                f"multiple of {nm[1]}; got {uneven[0][1]}. Add the module to `ignore`"
            )
        for name, linear in modules:
            self._prune(name, linear, nm)
        zeros = sum(r["zeros"] for r in self._records)
        total = sum(r["numel"] for r in self._records)
        logger.info(
            "OneshotMagnitudePruningModifier: {} modules pruned ({}), {:.1%} of their weights zero",
            len(self._records),
            self.mask_structure,
            zeros / total,
        )

    def on_finalize(self, state: State, **kwargs) -> bool:
        return True

    # ---- work -----------------------------------------------------------------------
    def _resolve(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        modules = [
            (name, module)
            for name, module in match_named_modules(model, self.targets, self.ignore)
            if isinstance(module, nn.Linear)
        ]
        if not modules:
            raise ValueError(
                f"OneshotMagnitudePruningModifier found no Linear modules matching targets={self.targets} "
                f"(ignore={self.ignore}). Please check `targets` in the recipe."
            )
        return modules

    @torch.no_grad()
    def _prune(self, name: str, linear: nn.Linear, nm: tuple[int, int] | None) -> None:
        W = linear.weight.detach()  # (m, n); an onloaded copy when offloaded
        W = W.masked_fill(magnitude_mask(W, self.sparsity, nm), 0.0)
        write_parameter(linear, "weight", W)  # in-place edits of an offloaded weight are lost
        zeros = int((W == 0).sum())
        self._records.append(dict(name=name, m=W.shape[0], n=W.shape[1], zeros=zeros, numel=W.numel()))
        logger.debug("{} ({}x{}): {:.1%} zero", name, W.shape[0], W.shape[1], zeros / W.numel())


def parse_mask_structure(value: str) -> tuple[int, int] | None:
    """None for ``unstructured`` (or llmcompressor's ``0:0``), else (N, M) of ``N:M``."""
    if value in ("unstructured", "0:0"):
        return None
    parts = value.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
    raise ValueError(
        f"`mask_structure` must be 'unstructured' or 'N:M' with 0 < N < M (N of every M weights "
        f"zeroed, e.g. '2:4'); got {value!r}"
    )


def magnitude_mask(W: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean mask (m, n), True where W is pruned: the smallest |w| per row or per N:M group."""
    m, n = W.shape
    if nm is None:
        groups, k = W.abs().reshape(m, 1, n), round(sparsity * n)
    else:
        groups, k = W.abs().reshape(m, n // nm[1], nm[1]), nm[0]  # (m, G, M)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    if k:
        mask.scatter_(2, groups.topk(k, dim=2, largest=False).indices, True)
    return mask.reshape(m, n)


def _pending_factor(model: nn.Module, name: str) -> bool:
    parent, _, child = name.rpartition(".")
    if child not in ("svd_u", "svd_v"):
        return False
    layer = model.get_submodule(parent)
    return isinstance(layer, SVDLinear) and layer.pending
