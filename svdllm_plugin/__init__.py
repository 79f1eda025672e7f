"""svdllm-plugin: SVD-LLM truncation-aware whitening SVD as an llm-compressor plugin.

Importing the package registers its modifiers with llmcompressor's ModifierFactory, so
YAML recipes can name them (``SVDLLMModifier: {ratio: 0.2}``).
"""

from svdllm_plugin.layers import SVDLinear
from svdllm_plugin.modifiers.lora import SequentialLoRAModifier
from svdllm_plugin.modifiers.pruning import OneshotMagnitudePruningModifier
from svdllm_plugin.modifiers.svd import SVDLLMModifier
from svdllm_plugin.version import __version__

__all__ = [
    "SVDLinear", "SVDLLMModifier", "SequentialLoRAModifier", "OneshotMagnitudePruningModifier", "__version__",
]
