"""Persistence of factorized models: HF-format folders (safetensors + config.json), no pickles.

- ``format``: the on-disk format (the ``svdllm`` config.json record, stock-loading entries).
- ``pretrained``: ``save_pretrained`` / ``load_pretrained``, dense or packed by one rule.
- ``packed``: the compressed-tensors pack-quantized half of it.
- ``card``: the folder's README.md.
- ``modeling_svdllm.py`` / ``svdllm_runtime.py``: copied into every folder for stock transformers;
  the plugin imports the first only for the auto_map entries it writes.

Nothing here imports llmcompressor; compressed-tensors only inside the packed functions.
"""

from svdllm_plugin.checkpoint.card import write_model_card
from svdllm_plugin.checkpoint.format import CONFIG_KEY, read_safetensors
from svdllm_plugin.checkpoint.pretrained import factorize_structure, load_pretrained, save_pretrained

__all__ = [
    "CONFIG_KEY",
    "save_pretrained",
    "load_pretrained",
    "factorize_structure",
    "read_safetensors",
    "write_model_card",
]
