"""Packed checkpoints: compressed-tensors ``pack-quantized`` factor models (GPTQ W8 / W4 / W3 / W2).

After ``GPTQModifier`` has quantized the ``svd_u`` / ``svd_v`` children of every SVDLinear, the
in-memory model still holds float weights (GPTQ writes the dequantized values back and
compressed-tensors fake-quantizes them again in every forward). ``save_packed`` writes the
integers themselves (``weight_packed`` int32, ``weight_scale``, ``weight_shape`` per Linear),
the layout vLLM and transformers' compressed-tensors quantizer read.

``load_packed`` builds the architecture, swaps in SVDLinear of the saved ranks and runs the
steps of transformers' compressed-tensors quantizer (attach schemes, load packed tensors,
decompress). Stock transformers does the same through the folder's modeling_svdllm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from svdllm_plugin.checkpoint.format import read_safetensors, tied_keys
from svdllm_plugin.layers import SVDLinear

__all__ = ["is_quantized", "save_packed", "load_packed_weights"]


def is_quantized(model: nn.Module) -> bool:
    """True when compressed-tensors quantization schemes are attached (after oneshot with GPTQ)."""
    return any(getattr(m, "quantization_scheme", None) is not None for m in model.modules())


def save_packed(model, folder: Path) -> None:
    """Write a quantized model into ``folder`` as compressed-tensors pack-quantized.

    The three steps of llmcompressor's ``save_pretrained`` wrapper, called directly:
    compress in memory, transformers' save, add ``quantization_config`` to config.json. Not
    the wrapper itself: it re-writes config.json from the ORIGINAL model folder, and on a
    reloaded model it tries to parse a recipe.yaml that llmcompressor's own loader rejects.

    Side effect (compressed-tensors' design): the model's Linears are compressed in place and
    decompress again on the next forward pass; the values are unchanged.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.offload import as_single_threaded

    compressor = ModelCompressor.from_pretrained_model(model)  # int weight-only infers pack-quantized
    # Under torchrun only rank 0 saves; compress_model would split the modules over the ranks and
    # exchange results (a collective the waiting ranks never join: a deadlock). Locally, as
    # compressed-tensors' own decompress-on-forward hook does for a subset of ranks.
    with as_single_threaded():
        compressor.compress_model(model, skip_compressed=True)
    type(model).save_pretrained(model, folder)  # the class method: skips an instance-level wrapper
    compressor.update_config(folder)


def load_packed_weights(model: nn.Module, folder) -> nn.Module:
    """Load a compressed-tensors folder into ``model`` (SVDLinear structure already built).

    Follows transformers' CompressedTensorsHfQuantizer: attach the saved schemes, put the
    packed tensors on the modules, decompress. The weights end up as the dequantized values,
    which is what the in-memory model computes with after ``oneshot``.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import is_module_quantized
    from compressed_tensors.utils import get_direct_state_dict, replace_direct_state_dict

    folder = Path(folder)
    qdict = json.loads((folder / "config.json").read_text()).get("quantization_config")
    method = (qdict or {}).get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(
            f"{folder} is not a compressed-tensors checkpoint (quant_method {method!r}); only folders "
            "written by save_pretrained load back here. A GPTQ export is for other runtimes: read it with "
            "svdllm_plugin.export.unpack_gptq_linear"
        )
    pending = [n for n, m in model.named_modules() if isinstance(m, SVDLinear) and m.pending]
    if pending:
        raise ValueError(
            f"SVDLinear {pending[0]} is pending; call .activate() or build it with SVDLinear(...)"
        )
    qconfig = QuantizationConfig.model_validate(qdict)
    apply_quantization_config(model, qconfig, show_progress=False)

    state = read_safetensors(folder)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        prefix, _, local = key.rpartition(".")
        by_module.setdefault(prefix, {})[local] = tensor
    loaded = set()
    for name, module in model.named_modules():
        if not is_module_quantized(module):
            continue
        local = by_module.get(name)
        if local is None or "weight_packed" not in local:
            raise ValueError(f"{folder} has no packed weight for {name}; the folder is incomplete")
        saved_shape = tuple(local["weight_shape"].tolist())
        if saved_shape != tuple(module.weight.shape):
            raise ValueError(
                f"{name}: checkpoint weight {saved_shape} vs model {tuple(module.weight.shape)}; "
                "rebuild the SVDLinear structure with the ranks saved in config.json"
            )
        kept = {k: v for k, v in get_direct_state_dict(module).items() if k != "weight"}  # e.g. bias=None
        replace_direct_state_dict(module, {**kept, **local})
        module.quantization_status = QuantizationStatus.COMPRESSED
        loaded.update(f"{name}.{k}" for k in local)

    rest = {k: v for k, v in state.items() if k not in loaded}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k not in loaded and k not in tied_keys(model)]
    if missing or unexpected:
        raise ValueError(
            f"{folder} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    ModelCompressor(quantization_config=qconfig).decompress_model(model)
    if tied_keys(model):
        model.tie_weights()
    modules = {k.rpartition(".")[0] for k in loaded}
    logger.info("Loaded {} packed quantized Linears from {}", len(modules), folder)
    return model
