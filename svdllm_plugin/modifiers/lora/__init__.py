"""SequentialLoRAModifier: LoRA on the SVD factors, registered so YAML recipes can name it."""

from llmcompressor.modifiers.factory import ModifierFactory

from svdllm_plugin.modifiers.lora.base import SequentialLoRAModifier

# register() only adds to the factory's "registered" table, which refresh() leaves alone, so
# importing this before or after llmcompressor loads its own modifiers works the same
ModifierFactory.register("SequentialLoRAModifier", SequentialLoRAModifier)

__all__ = ["SequentialLoRAModifier"]
