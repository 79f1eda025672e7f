from svdllm_plugin.modifiers.svd.base import SVDLLMModifier

__all__ = ["SVDLLMModifier"]
