"""Formats beside the plugin's own checkpoints: the auto-gptq layout, bitsandbytes, the integer view.

Submodules import their heavy dependencies (compressed-tensors, bitsandbytes) inside functions.
"""

from svdllm_plugin.export.bitsandbytes import to_bitsandbytes
from svdllm_plugin.export.gptq import export_gptq, pack_gptq_linear, unpack_gptq_integers, unpack_gptq_linear
from svdllm_plugin.export.integers import QuantizedWeight, quantized_weights, read_quantized_weights

__all__ = [
    "export_gptq",
    "pack_gptq_linear",
    "unpack_gptq_linear",
    "unpack_gptq_integers",
    "to_bitsandbytes",
    "QuantizedWeight",
    "quantized_weights",
    "read_quantized_weights",
]
