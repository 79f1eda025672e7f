"""SVDLLMModifier, registered so YAML recipes can name it."""

from llmcompressor.modifiers.factory import ModifierFactory

from svdllm_plugin.modifiers.svd.base import SVDLLMModifier

ModifierFactory.register("SVDLLMModifier", SVDLLMModifier)

__all__ = ["SVDLLMModifier"]
