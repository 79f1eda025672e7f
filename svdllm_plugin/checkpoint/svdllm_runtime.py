"""Load-time inference options of a compressed folder (copied beside modeling_svdllm.py).

``apply_runtime_options(model, options)`` is called by modeling_svdllm's
``_apply_runtime_options`` after the weights are loaded, with the ``svdllm_runtime`` dict of
config.json updated by the ``svdllm_runtime=`` kwarg of ``from_pretrained``. Each option name
maps to a function ``(model, value) -> model`` in ``OPTIONS``. Implementations must import only
torch and transformers; put them in files beside this one and import them relatively
(``from .fused_factors import fuse_shared_inputs``): transformers copies relatively imported
files of a remote-code folder along with it.
"""

from __future__ import annotations

__all__ = ["OPTIONS", "apply_runtime_options"]

OPTIONS: dict = {}  # option name -> function(model, value) -> model


def apply_runtime_options(model, options: dict):
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown svdllm_runtime options {unknown}; this folder supports {sorted(OPTIONS)}")
    for name, value in options.items():
        model = OPTIONS[name](model, value)
    return model
