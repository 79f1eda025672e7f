"""Offload-safe parameter writes (compressed-tensors owns offloading).

When a model is offloaded (sequential onloading on a GPU, or CPU/disk offload from
``compressed_tensors.offload.load_offloaded_model``), ``module.weight`` of an offloaded
module is an onloaded *copy*: in-place edits and assignments to its data are lost. Every change
this plugin makes to a parameter goes through ``write_parameter``, which uses
``update_offload_parameter`` (same shape) or replaces the entry in the module's offload
cache (new shape, e.g. a factor whose rank changed), so the new value is what the next
onload, the next forward and ``save_pretrained`` see.
"""

from __future__ import annotations

import torch
from compressed_tensors.offload import (
    disable_onloading,
    get_cache_init_kwargs,
    offload_module,
    update_offload_parameter,
)
from compressed_tensors.offload.cache import OffloadCache
from torch import nn

__all__ = ["is_offloaded", "stored", "write_parameter", "offload_like"]


def is_offloaded(module: nn.Module) -> bool:
    return isinstance(module._parameters, OffloadCache)


def stored(module: nn.Module, name: str) -> torch.Tensor | None:
    """The stored (offloaded) value of a parameter or buffer, without onloading it.

    For disk offload this is a meta tensor: use it for shape, dtype and requires_grad only.
    """
    with disable_onloading():
        return getattr(module, name, None)


@torch.no_grad()
def write_parameter(module: nn.Module, name: str, data: torch.Tensor) -> None:
    """Set ``module.<name>`` to ``data`` (cast to the parameter's dtype), offloaded or not.

    Same shape: written in place into the stored copy (the parameter keeps its identity).
    New shape: the old entry is removed (its offload file deleted) and a new Parameter is
    registered, offloaded the same way.
    """
    current = stored(module, name)
    if current is None:
        raise AttributeError(f"{type(module).__name__} has no parameter {name!r}")
    data = data.detach().to(current.dtype).contiguous()  # safetensors (disk offload) needs it
    if tuple(current.shape) == tuple(data.shape):
        update_offload_parameter(module, name, data)
        return
    requires_grad = current.requires_grad
    if is_offloaded(module):
        del module._parameters[name]
        module._parameters[name] = nn.Parameter(data.contiguous(), requires_grad)
    else:
        setattr(module, name, nn.Parameter(data.to(current.device).contiguous(), requires_grad))


def offload_like(new: nn.Module, reference: nn.Module) -> None:
    """Offload ``new`` and all its submodules the way ``reference`` is offloaded (no-op if it is not)."""
    if not is_offloaded(reference):
        return
    kwargs = get_cache_init_kwargs(reference)
    for module in new.modules():
        if not is_offloaded(module):
            offload_module(module, **kwargs)
