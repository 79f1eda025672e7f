"""svdllm-plugin: SVD-LLM truncation-aware whitening SVD as an llm-compressor plugin.

Importing the package registers its modifiers with llmcompressor's ModifierFactory, so
YAML recipes can name them (``SVDLLMModifier: {ratio: 0.2}``).
"""

from llmcompressor.modifiers.factory import ModifierFactory

from svdllm_plugin.layers import SVDLinear
from svdllm_plugin.modifiers.svd import SVDLLMModifier
from svdllm_plugin.version import __version__

ModifierFactory.register("SVDLLMModifier", SVDLLMModifier)

__all__ = ["SVDLinear", "SVDLLMModifier", "__version__"]
