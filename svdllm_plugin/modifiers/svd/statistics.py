"""Calibration statistics per distinct Linear input, accumulated by forward-pre hooks.

Modules that read the same input tensor (q/k/v, gate/up) share one accumulator: the hook
sees the same tensor object for each of them within one forward, and groups them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = ["InputStatistics", "StatisticsCollector", "STATISTICS"]


@dataclass
class InputStatistics:
    """Sums over calibration tokens of one input x (n,): H = sum x x^T, sum |x|, max |x|."""

    H: torch.Tensor  # (n, n) float64
    abs_sum: torch.Tensor  # (n,) float64, for ASVD's abs-mean scaling
    abs_max: torch.Tensor  # (n,) float64, for ASVD's abs-max scaling
    tokens: int = 0
    C: torch.Tensor | None = None  # (n, n) float64: sum x_orig x^T, for the output-matching update

    @classmethod
    def empty(cls, n: int, device, want: frozenset = frozenset({"H", "abs"})) -> "InputStatistics":
        """Zeros to accumulate into; X X^T is (0, 0) unless ``want`` has "H" (the n x n float64
        matrix is 1.4 GB for a 7B down_proj input, and svd / fwsvd / asvd never read it)."""
        zeros = dict(dtype=torch.float64, device=device)
        H = torch.zeros(n, n, **zeros) if "H" in want else torch.zeros(0, 0, **zeros)
        return cls(H, torch.zeros(n, **zeros), torch.zeros(n, **zeros))

    def add(self, x: torch.Tensor, want: frozenset = frozenset({"H", "abs"})) -> None:
        """Accumulate only what the method reads: X X^T costs n/m times the layer's own matmul."""
        X = x.reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, n)
        for key, accumulate in STATISTICS.items():
            if key in want:
                accumulate(self, X)
        self.tokens += X.shape[0]

    def add_cross(self, x_original: torch.Tensor, x: torch.Tensor) -> None:
        """Accumulate C += X X'^T from the original model's input and this (propagated) input
        on the same tokens (call after ``add`` of the same batch)."""
        X = x.reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, n)
        X_o = x_original.reshape(-1, x_original.shape[-1]).to(torch.float64)  # (tokens, n)
        if X_o.shape != X.shape:
            raise ValueError(
                f"original and propagated inputs differ in shape ({tuple(X_o.shape)} vs {tuple(X.shape)}): "
                "the original stream lost step with the calibration batches"
            )
        if self.C is None:
            self.C = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
        self.C.addmm_(X_o.T, X)

    def covariance(self) -> torch.Tensor:
        """H / tokens: the same whitening up to scale, better conditioned numbers."""
        return self.H / max(self.tokens, 1)

    def cross_covariance(self) -> torch.Tensor:
        """C / tokens (X X'^T over the same tokens), scaled like ``covariance``."""
        if self.C is None:
            raise RuntimeError("no cross statistics: this collector was not paired with the original stream")
        return self.C / max(self.tokens, 1)


def _add_H(stats: InputStatistics, X: torch.Tensor) -> None:
    stats.H.addmm_(X.T, X)  # in float64 per batch: a float32 X^T X loses digits before the sum


def _add_abs(stats: InputStatistics, X: torch.Tensor) -> None:
    stats.abs_sum += X.abs().sum(0).to(torch.float64)
    stats.abs_max = torch.maximum(stats.abs_max, X.abs().amax(0).to(torch.float64))


# what a method may read (``MethodSpec.statistics``): name -> how a batch X (tokens, n) is added
STATISTICS: dict[str, Callable[[InputStatistics, torch.Tensor], None]] = {"H": _add_H, "abs": _add_abs}


@dataclass
class StatisticsCollector:
    """Routes each module's input to its group's accumulator."""

    names: dict[nn.Module, str]
    want: frozenset = frozenset({"H", "abs"})  # which statistics the method reads
    leader: dict[nn.Module, nn.Module] = field(default_factory=dict)
    stats: dict[nn.Module, InputStatistics] = field(default_factory=dict)
    keep_inputs: bool = False  # hold each group's last input (the original stream, for pairing)
    pair_with: "StatisticsCollector | None" = None  # its held inputs pair with ours into C
    inputs: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    only: set[nn.Module] | None = None  # an intra-layer replay collects one input group
    _last_input: torch.Tensor | None = None
    _last_module: nn.Module | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.only is not None and module not in self.only:
            return
        x = args[0]
        if not torch.isfinite(x).all():
            raise ValueError(
                f"non-finite activations (inf/nan) reach {self.names.get(module, module)}: "
                "the model overflows on the calibration data; load it in float32 or bfloat16 "
                "(not float16) and check the calibration text"
            )
        if module not in self.leader:
            shared = x is self._last_input and self._last_module is not None
            self.leader[module] = self.leader[self._last_module] if shared else module
        self._last_input, self._last_module = x, module
        lead = self.leader[module]
        if lead is module:
            if lead not in self.stats:
                self.stats[lead] = InputStatistics.empty(x.shape[-1], x.device, self.want)
            self.stats[lead].add(x.detach(), self.want)
            if self.keep_inputs:  # one batch of one layer's inputs at a time: consumed by the pair
                self.inputs[lead] = x.detach()
            if self.pair_with is not None:
                original = self.pair_with.inputs.pop(lead, None)
                if original is not None:
                    self.stats[lead].add_cross(original.to(x.device), x.detach())

    def get(self, module: nn.Module) -> InputStatistics | None:
        return self.stats.get(self.leader.get(module))

    def release_input(self) -> None:
        """Drop the reference to the last input (call between batches)."""
        self._last_input = self._last_module = None

    def release(self, modules) -> None:
        """Free the accumulators of these modules' groups (and the held input)."""
        for module in modules:
            self.stats.pop(self.leader.get(module), None)
            self.inputs.pop(self.leader.get(module), None)
        self._last_input = self._last_module = None
