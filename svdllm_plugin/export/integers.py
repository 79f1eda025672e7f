"""The integers of quantized Linears, in compressed-tensors' signed convention.

The view the export formats (GPTQ) and the tests read: from an in-memory model after oneshot
(``quantized_weights``) or straight from a saved pack-quantized folder (``read_quantized_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from svdllm_plugin.checkpoint.format import read_safetensors

__all__ = ["QuantizedWeight", "quantized_weights", "read_quantized_weights"]


@dataclass
class QuantizedWeight:
    """The integers of one quantized Linear, in compressed-tensors' signed convention.

    w = (q - zero_point) * scale, q in [-2**(bits-1), 2**(bits-1) - 1]; groups are
    ``group_size`` consecutive input columns (a per-channel scheme has group_size = n).
    """

    q: torch.Tensor  # (m, n) int8
    scale: torch.Tensor  # (m, n // group_size)
    zero_point: torch.Tensor | None  # (m, n // group_size) int8; None when symmetric
    bits: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def dequantize(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight (m, n); ``scale`` overrides the stored one (e.g. rounded to fp16)."""
        scale = self.scale if scale is None else scale
        w = self.q.to(scale.dtype)
        if self.zero_point is not None:
            w = w - self.zero_point.to(scale.dtype).repeat_interleave(self.group_size, dim=1)
        return w * scale.repeat_interleave(self.group_size, dim=1)


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """{module name: integers} of every quantized Linear of an in-memory model.

    Uses compressed-tensors' own ``quantize`` on the stored weight and qparams, the same
    call its packer makes, so the integers are the ones a saved checkpoint holds. Works
    before and after ``save_pretrained`` (a compressed module is unpacked, not mutated).
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import is_module_quantized
    from compressed_tensors.utils import get_direct_state_dict

    out = {}
    for name, module in model.named_modules():
        if not is_module_quantized(module) or module.quantization_scheme.weights is None:
            continue
        scheme, args = module.quantization_scheme, module.quantization_scheme.weights
        if args.type != "int" or args.strategy not in ("group", "channel"):
            raise ValueError(f"{name}: only int group/channel weight quantization is supported; got {args}")
        state = get_direct_state_dict(module)
        if module.quantization_status == QuantizationStatus.COMPRESSED:
            state = BaseCompressor.get_value_from_registry(scheme.format.value).decompress(state, scheme)
        W, scale = state["weight"], state["weight_scale"]
        zero_point = None if args.symmetric else state["weight_zero_point"]
        q = quantize(x=W, scale=scale, zero_point=zero_point, args=args, dtype=torch.int8)
        group_size = args.group_size if args.strategy == "group" else W.shape[1]
        out[name] = QuantizedWeight(q, scale, zero_point, args.num_bits, group_size)
    return out


def read_quantized_weights(folder) -> dict[str, QuantizedWeight]:
    """{module name: integers} read straight from a saved pack-quantized folder.

    Bits and group size are read off the tensor shapes (bits = 32 * packed words / n), so
    this needs no model and checks the file rather than our own bookkeeping.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    state = read_safetensors(Path(folder))
    out = {}
    for key in state:
        if not key.endswith(".weight_packed"):
            continue
        name = key.removesuffix(".weight_packed")
        packed, scale = state[key], state[f"{name}.weight_scale"]
        m, n = state[f"{name}.weight_shape"].tolist()
        bits = packed.shape[1] * 32 // n
        group_size = n // scale.shape[1]
        q = unpack_from_int32(packed, bits, torch.Size((m, n)))
        zero_point = state.get(f"{name}.weight_zero_point")
        if zero_point is not None:
            zero_point = unpack_from_int32(zero_point, bits, torch.Size(scale.shape), packed_dim=0)
        out[name] = QuantizedWeight(q, scale, zero_point, bits, group_size)
    return out
