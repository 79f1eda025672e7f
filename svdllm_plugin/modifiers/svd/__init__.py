"""SVDLLMModifier, registered so YAML recipes can name it."""

from llmcompressor.modifiers.factory import ModifierFactory

from svdllm_plugin import distributed  # noqa: F401  (passes.py still imports it from here)
from svdllm_plugin.modifiers.svd.base import SVDLLMModifier
from svdllm_plugin.modifiers.svd.refit import FactorRefitModifier

ModifierFactory.register("SVDLLMModifier", SVDLLMModifier)
ModifierFactory.register("FactorRefitModifier", FactorRefitModifier)

__all__ = ["SVDLLMModifier", "FactorRefitModifier"]
