"""FactorRefitModifier: quantization-aware W_u, between a GPTQ of ``svd_v`` and one of ``svd_u``.

Quantizing both factors in ONE GPTQ pass calibrates svd_u on W_v X, the output of the
unquantized W_v: the error Q(W_v) adds is never compensated. Put this modifier in the same
stage as, and AFTER, the GPTQModifier that quantizes ``svd_v``, and quantize ``svd_u`` in a
later stage:

    quant_v_stage:  {GPTQModifier: {targets: ["re:.*svd_v$"], ...}, FactorRefitModifier: {}}
    quant_u_stage:  {GPTQModifier: {targets: ["re:.*svd_u$"], ...}}

Per decoder layer it accumulates X X^T of each factorized layer's input and keeps the layer's
W_v before quantization; at the layer's epoch end (after GPTQ wrote Q(W_v)) it refits

    W_u <- argmin ||W_u0 W_v0 X - W_u Q(W_v) X||_F = W_u0 W_v0 H Q^T (Q H Q^T)^{-1}

(``refit_u`` with the cross term), so the unquantized factors' outputs are matched through
the quantized W_v; the next stage's GPTQ then quantizes W_u with the Hessian of Q(W_v) X.
Memory: one decoder layer's X X^T and W_v copies.
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr

from svdllm_plugin.layers import SVDLinear
from svdllm_plugin.modifiers.svd.decompose import refit_u
from svdllm_plugin.offload import write_parameter

__all__ = ["FactorRefitModifier"]


class FactorRefitModifier(Modifier):
    """Refit each SVDLinear's W_u on the quantized W_v's outputs (see the module docstring).

    :param targets: SVDLinear modules to refit (llmcompressor matching). Default: all.
    :param damp: relative diagonal damping of the (k, k) system.
    """

    requires_calibration_data: bool = True

    targets: list[str] = Field(default_factory=lambda: ["SVDLinear"])
    ignore: list[str] = Field(default_factory=list)
    damp: float = 1e-6

    _layers: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)  # svd_v -> SVDLinear name
    _owner: dict[torch.nn.Module, SVDLinear] = PrivateAttr(default_factory=dict)
    _H: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)
    _W_v: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)
    _tokens: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    _gains: list[dict] = PrivateAttr(default_factory=list)
    _warned: bool = PrivateAttr(default=False)

    def on_initialize(self, state: State, **kwargs) -> bool:
        for name, module in match_named_modules(state.model, self.targets, self.ignore):
            if isinstance(module, SVDLinear):
                self._layers[module.svd_v] = name
                self._owner[module.svd_v] = module
        if not self._layers:
            raise ValueError(
                f"FactorRefitModifier found no SVDLinear matching targets={self.targets}: place it after "
                "an SVDLLMModifier stage"
            )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        for svd_v in self._layers:
            self.register_hook(svd_v, self._observe, "forward_pre")

    def _observe(self, module: torch.nn.Module, args: tuple) -> None:
        X = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)  # (tokens, n)
        if module not in self._H:
            self._H[module] = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
            self._W_v[module] = module.weight.detach().to(torch.float64).clone()  # before GPTQ
            self._tokens[module] = 0
        self._H[module].addmm_(X.T, X)
        self._tokens[module] += X.shape[0]

    def on_sequential_epoch_end(self, state: State, event: Event, modules=None, **kwargs):
        self._refit_ready()

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._refit_ready()
        self.remove_hooks()

    def _refit_ready(self) -> None:
        for svd_v in list(self._H):
            layer = self._owner[svd_v]
            H = self._H.pop(svd_v) / max(self._tokens.pop(svd_v), 1)  # (n, n)
            W_v0 = self._W_v.pop(svd_v)  # (k, n)
            Q = svd_v.weight.detach().to(torch.float64)  # (k, n): quantized by now
            if torch.equal(Q, W_v0) and not self._warned:
                self._warned = True
                logger.warning(
                    "FactorRefitModifier: svd_v of {} was not changed in this pass, so there is nothing to "
                    "refit for; run it in the SAME sequential pass as, and after, the GPTQModifier of svd_v "
                    "(oneshot(..., pipeline='sequential'))",
                    self._layers[svd_v],
                )
            W_u0 = layer.svd_u.weight.detach().to(torch.float64)  # (m, k)
            W_u = refit_u(W_u0 @ W_v0, Q, H, damp=self.damp)  # target W_u0 W_v0 X through Q(W_v)
            before = _objective(W_u0 @ W_v0, W_u0, Q, H)
            after = _objective(W_u0 @ W_v0, W_u, Q, H)
            write_parameter(layer.svd_u, "weight", W_u)
            self._gains.append(dict(name=self._layers[svd_v], before=before, after=after))
            logger.info(
                "{}: W_u refit on Q(W_v) X | output error {:.4g} -> {:.4g}",
                self._layers[svd_v],
                before,
                after,
            )

    @property
    def gains(self) -> list[dict]:
        """Per layer: the output error ||W_u0 W_v0 X - W_u Q(W_v) X||^2 / tokens before and after."""
        return list(self._gains)


def _objective(T: torch.Tensor, W_u: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = T - W_u @ Q  # (m, n)
    return float((D @ H * D).sum())
