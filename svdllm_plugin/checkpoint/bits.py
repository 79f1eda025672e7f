"""Honest bytes of a saved folder: its safetensors bytes, and the bits per weight of its decoder Linears.

Two figures, both read from the files (nothing is loaded):

- ``safetensors_bytes``: the size of the ``*.safetensors`` files on disk (headers included): what a
  user downloads, embeddings and norms in whatever dtype they were saved in.
- ``decoder_linear_bits``: 8 x (bytes of every tensor that belongs to a decoder layer's Linear) /
  (weights of those Linears in the dense model). "Belongs" means the tensor's key lies under the
  Linear's name: its weight or packed weight, scales, zero points, g_idx, shape, bias, SVD factors
  (``q_proj.svd_u...``), compensation factors and anything else a modifier hangs below it. The
  denominator is the DENSE model's count (m x n per Linear), so a factorized or compensated layer
  is charged for all it stores against the weights it replaces.

The Linears are those of the base architecture built from config.json on the meta device (no
memory): every ``nn.Linear`` under a decoder layer (``...layers.<i>...``). The tied lm_head and the
embeddings are not decoder Linears; they count in the file bytes only.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

__all__ = ["checkpoint_bits", "decoder_linears", "tensor_bytes", "format_bits"]

_DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def tensor_bytes(folder) -> dict[str, int]:
    """{tensor key: bytes of its data} over all safetensors files of ``folder`` (headers only read)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors file; pass a saved model folder")
    sizes = {}
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, info in header.items():
            if key != "__metadata__":
                begin, end = info["data_offsets"]
                sizes[key] = end - begin
    return sizes


def decoder_linears(config) -> dict[str, int]:
    """{name: in x out} of the dense model's Linears inside its decoder layers (built on meta)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: module.in_features * module.out_features
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _DECODER_LAYER.search(name + ".")
    }


def _folder_config(folder):
    from transformers import AutoConfig

    from svdllm_plugin.checkpoint import format as fmt

    config_dict = fmt.read_config(folder)
    if config_dict.get("model_type") == fmt.MODEL_TYPE:
        return fmt.base_config(folder)
    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None  # the architecture only: no quantizer is built on meta
    return config


def checkpoint_bits(folder, config=None) -> dict:
    """The byte accounting of a saved ``folder`` (``config``: its base config, default: read it).

    Returns ``safetensors_bytes``, ``decoder_linear_bytes``, ``decoder_linear_weights``,
    ``decoder_linear_bits`` (average bits per dense weight, everything counted) and ``other_bytes``
    (tensors outside the decoder Linears: embeddings, norms, an untied lm_head).
    """
    folder = Path(folder)
    sizes = tensor_bytes(folder)
    linears = decoder_linears(config if config is not None else _folder_config(folder))
    if not linears:
        raise ValueError(f"{folder}: the architecture has no Linear inside decoder layers (`layers.<i>`)")
    owned = 0
    for key, size in sizes.items():
        prefix = key
        while "." in prefix:  # the Linear this tensor lies under, if any
            prefix = prefix.rpartition(".")[0]
            if prefix in linears:
                owned += size
                break
    weights = sum(linears.values())
    return {
        "safetensors_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        "decoder_linear_bytes": owned,
        "decoder_linear_weights": weights,
        "decoder_linear_bits": 8 * owned / weights,
        "other_bytes": sum(sizes.values()) - owned,
    }


def format_bits(size: dict) -> str:
    """One line: ``12.3 MB safetensors, 4.27 bits per decoder-Linear weight``."""
    return (
        f"{size['safetensors_bytes'] / 1e6:.2f} MB safetensors, "
        f"{size['decoder_linear_bits']:.3f} bits per decoder-Linear weight"
    )
