"""vLLM plugin: serve svdllm-plugin compressed folders with vLLM's own layers.

Installed into the serving venv (``pip install integrations/vllm``), vLLM calls :func:`register`
in every process through the ``vllm.general_plugins`` entry point; it registers the architecture
that compressed folders name in config.json (``SVDLLMForCausalLM``). Nothing is imported from
vLLM until the model is built, so registering costs nothing.
"""

from __future__ import annotations

ARCHITECTURE = "SVDLLMForCausalLM"  # config.json "architectures" of every compressed folder

__all__ = ["ARCHITECTURE", "register"]


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "svdllm_vllm.model:SVDLLMForCausalLM")
