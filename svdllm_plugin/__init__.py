"""svdllm-plugin: SVD-LLM truncation-aware whitening SVD as an llm-compressor plugin.

Importing the package registers its modifiers with llmcompressor's ModifierFactory, so
YAML recipes can name them (``SVDLLMModifier: {ratio: 0.2}``). The import itself is light:
the modifiers are registered when llmcompressor loads (at once if it is already loaded), and
the names below and the submodules (``svdllm_plugin.checkpoint``, ...) load on first use.
"""

from __future__ import annotations

import importlib
import importlib.util

from svdllm_plugin._imports import when_imported
from svdllm_plugin.version import __version__

__all__ = [
    "SVDLinear",
    "SVDLLMModifier",
    "SequentialLoRAModifier",
    "OneshotMagnitudePruningModifier",
    "__version__",
]

_EXPORTS = {
    "SVDLinear": "svdllm_plugin.layers",
    "SVDLLMModifier": "svdllm_plugin.modifiers.svd",
    "SequentialLoRAModifier": "svdllm_plugin.modifiers.lora",
    "OneshotMagnitudePruningModifier": "svdllm_plugin.modifiers.pruning",
    "LowRankCompensationModifier": "svdllm_plugin.modifiers.compensation",
}


def register_modifiers() -> None:
    """Register every modifier of the plugin with llmcompressor's ModifierFactory."""
    for module in (
        "svdllm_plugin.modifiers.svd",
        "svdllm_plugin.modifiers.lora",
        "svdllm_plugin.modifiers.pruning",
        "svdllm_plugin.modifiers.compensation",
    ):
        importlib.import_module(module)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # svdllm_plugin.checkpoint, ...
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


when_imported("llmcompressor", register_modifiers)
