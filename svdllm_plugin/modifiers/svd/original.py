"""The original model's activation stream, carried through the sequential pipeline.

llmcompressor's sequential pipeline propagates ONE stream of hidden states from decoder
layer to decoder layer: with error propagation on, layer i sees the outputs of the
already-compressed layers < i. Methods that also need what the ORIGINAL model feeds layer i
(SVD-LLM's closed-form update whitens with the original statistics; an output-matching
update would need the original outputs too) can carry a second stream beside it:

    at decoder layer i's calibration forward on batch b (a forward-pre hook), run layer i
    once more on the original hidden states h_b (the layer is still dense: its SVDLinears
    are pending), with the statistics hooks routed to a second collector, and keep the
    output as h_b for layer i + 1.

Memory: one more copy of the pipeline's own activation cache (samples x tokens x hidden,
kept on ``device``, CPU by default), instead of X X^T of every layer of the model; time:
one more forward of each decoder layer, the cost of the separate pass it replaces.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from loguru import logger
from torch import nn

from svdllm_plugin.modifiers.svd import passes
from svdllm_plugin.modifiers.svd.statistics import StatisticsCollector

__all__ = ["OriginalStream", "decoder_layers", "carry_original"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the modules of its ``_no_split_modules`` classes (what
    llmcompressor's sequential pipeline uses as default sequential targets)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


class OriginalStream:
    """Per-batch hidden states of the original model; advanced by a forward-pre hook on each
    decoder layer (register ``pre_hook`` with ``with_kwargs=True``).

    While the layer reruns on the original stream, ``active`` is True: statistics hooks read
    it to route their input to the original-statistics collector. ``quiet`` (a context
    factory, e.g. llmcompressor's ``HooksMixin.disable_hooks(keep=...)``) silences other
    modifiers' hooks during that rerun.
    """

    def __init__(self, device: torch.device | str = "cpu", quiet=contextlib.nullcontext):
        self.device = torch.device(device)
        self.quiet = quiet
        self.active = False
        self.hidden: dict[int, torch.Tensor] = {}  # batch index -> original input of the next layer
        self._calls: dict[nn.Module, int] = {}

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.active:  # our own rerun
            return None
        batch = self._calls.get(module, 0)
        self._calls[module] = batch + 1
        positional = len(args) > 0
        hidden = args[0] if positional else kwargs["hidden_states"]
        original = self.hidden.get(batch)
        if original is None:  # the first decoder layer: both streams are the model's input
            original = hidden.detach()
        original = original.to(hidden.device)
        call_args = (original, *args[1:]) if positional else args
        call_kwargs = kwargs if positional else {**kwargs, "hidden_states": original}
        self.active = True
        try:
            with torch.no_grad(), self.quiet():
                out = module(*call_args, **call_kwargs)
        finally:
            self.active = False
        out = out[0] if isinstance(out, (tuple, list)) else out
        self.hidden[batch] = out.detach().to(self.device)
        return None

    def release(self) -> None:
        self.hidden.clear()
        self._calls.clear()


def carry_original(
    model: nn.Module,
    layers: dict[str, nn.Module],
    collector: StatisticsCollector,
    cross: bool,
    calib,
    handles: set,
    register: Callable,
) -> tuple[StatisticsCollector, OriginalStream | None]:
    """The original model's statistics beside the propagated ones in ``collector``: (their
    collector, the stream that feeds it). The stream is carried through the decoder layers
    (O(one layer) statistics; ``register(module, hook, "forward_pre", with_kwargs=True)`` adds
    its hook, ``handles`` stay on during its reruns); a model without known decoder layers gets
    every layer's original X X^T in one pass up front (O(model)) and no stream. ``cross``:
    the original inputs are held to pair with the propagated ones (C = X X'^T)."""
    names = collector.names
    original = StatisticsCollector(names=names, want=frozenset({"H"}), keep_inputs=cross)
    if cross:
        collector.pair_with = original
    decoders = decoder_layers(model)
    if not decoders and cross:
        raise ValueError(
            "update='output' pairs the original and the compressed model's inputs token by token "
            "through the decoder layers, but the model names none (model._no_split_modules)"
        )
    if not decoders:
        logger.warning(
            "closed_form_update: no decoder layers found (model._no_split_modules); collecting the "
            "original statistics of every layer in one pass first (memory grows with the model)"
        )
        return passes.collect_statistics(model, layers, calib), None
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    stream = OriginalStream(quiet=lambda: HooksMixin.disable_hooks(keep=handles))
    for layer in decoders:
        register(layer, stream.pre_hook, "forward_pre", with_kwargs=True)
    return original, stream
