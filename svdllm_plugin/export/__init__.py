"""Exports of quantized factor models to formats other runtimes read."""

from svdllm_plugin.export.gptq import export_gptq, pack_gptq_linear, unpack_gptq_integers, unpack_gptq_linear

__all__ = ["export_gptq", "pack_gptq_linear", "unpack_gptq_linear", "unpack_gptq_integers"]
