"""Intra-layer propagation: each Linear's statistics after the Linears before it IN THE SAME
decoder layer are compressed (o_proj after q/k/v, gate/up after o_proj, down_proj after gate/up).

llmcompressor's sequential pipeline runs a decoder layer's calibration forward once, with every
Linear of the layer still dense, then calls ``sequential_epoch_end``; error propagation only
reaches the NEXT decoder layer. To let o_proj see the error of the compressed q/k/v, the
modifier keeps this decoder layer's inputs (``LayerInputs``, offloaded like the pipeline's own
intermediates) and, after compressing one input group, reruns the layer on them to re-collect
the next group's statistics:

    stage 1: compress the first input group (q/k/v) from the calibration forward's statistics
    stage j: rerun the layer (groups < j compressed), collect group j's X' X'^T, compress it

Cost: one more forward of the decoder layer per input group after the first (3 for a Llama
layer); memory: one copy of one decoder layer's inputs, as the original stream holds.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["LayerInputs", "groups_in_order", "hold_layer_inputs", "replay_groups"]


def _to(device: torch.device):
    return lambda value: value.detach().to(device) if isinstance(value, torch.Tensor) else value


class LayerInputs:
    """Per-batch (args, kwargs) of each decoder layer calibrated since the last ``release``
    (one, unless a subgraph holds several), offloaded to ``device``; a forward-pre hook
    (register with ``with_kwargs=True``)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.held: dict[nn.Module, list[tuple[tuple, dict]]] = {}  # in calibration order
        self.onload: torch.device | None = None  # where the pipeline ran the layers
        self.replaying = False

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.replaying:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        self.onload = hidden.device
        self.held.setdefault(module, []).append(tree_map(_to(self.device), (args, kwargs)))
        return None

    @torch.no_grad()
    def replay(self, layer: nn.Module) -> None:
        """Run ``layer`` once more on each of its held batches (outputs discarded)."""
        self.replaying = True
        try:
            for args, kwargs in self.held.get(layer, []):
                args, kwargs = tree_map(_to(self.onload), (args, kwargs))
                layer(*args, **kwargs)
        finally:
            self.replaying = False

    def release(self) -> None:
        self.held = {}


def groups_in_order(
    leaders: dict[nn.Module, nn.Module], names: dict[nn.Module, str], ready: set[str]
) -> list[list[str]]:
    """The ready modules grouped by shared input, in the order the forward first reached them.

    ``leaders``: module -> the first module of its input group, insertion-ordered by first call
    (a ``StatisticsCollector``'s ``leader``); ``names``: module -> name.
    """
    groups: dict[nn.Module, list[str]] = {}
    for module, lead in leaders.items():
        name = names.get(module)
        if name in ready:
            groups.setdefault(lead, []).append(name)
    return list(groups.values())


def hold_layer_inputs(decoders: list[nn.Module], register: Callable) -> LayerInputs:
    """A ``LayerInputs`` hooked on every decoder layer (``register(module, hook, "forward_pre",
    with_kwargs=True)``); fails when the model names none."""
    if not decoders:
        raise ValueError(
            "intra_layer reruns each decoder layer, but the model names none "
            "(model._no_split_modules); set `intra_layer: false`"
        )
    inputs = LayerInputs()
    for layer in decoders:
        register(layer, inputs.pre_hook, "forward_pre", with_kwargs=True)
    return inputs


def replay_groups(
    inputs: LayerInputs,
    collector,
    layers: dict[str, nn.Module],
    groups: list[list[str]],
    keep: set,
    compress: Callable[[set[str]], None],
) -> None:
    """Compress each held decoder layer's input ``groups`` in forward order, rerunning the layer
    on its held inputs before each later group so that group's statistics see the compressed
    groups before it. ``collector``: the statistics hooks' collector; ``keep``: the hook handles
    that stay on during the rerun; ``compress(names)``: compresses the named Linears."""
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    for layer in list(inputs.held):
        inside = set(layer.modules())
        for j, group in enumerate(g for g in groups if layers[g[0]] in inside):
            if j > 0:  # statistics again, with the groups before this one compressed
                members = {layers[name] for name in group}
                collector.release(members)
                collector.only = members
                try:
                    with HooksMixin.disable_hooks(keep=keep):
                        inputs.replay(layer)
                finally:
                    collector.only = None
                    collector.release_input()
            compress(set(group))
