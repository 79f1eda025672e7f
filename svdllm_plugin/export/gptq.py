"""Export a GPTQ-quantized factor model in the auto-gptq checkpoint layout (auto-gptq not needed).

Per quantized Linear ``<name>`` (an SVD factor ``...q_proj.svd_u`` or a dense Linear), m x n:

    <name>.qweight  int32 (n * bits / 32, m)   integers, packed along the INPUT dim
    <name>.qzeros   int32 (G, m * bits / 32)   zero points MINUS ONE, packed along the output dim
    <name>.scales   fp16  (G, m)
    <name>.g_idx    int32 (n,)                 group of input column i: i // group_size
    <name>.bias     fp16  (m,)                 only where the Linear has a bias

plus ``quantize_config.json`` and a ``quantization_config`` (quant_method "gptq") in config.json.
Packing is auto-gptq's: integer j of a run of 32 sits at bit ``j * bits`` of the run's
``bits`` int32 words, least significant first (for 3 bits a value may straddle two words;
this is exactly auto-gptq's hand-written 3-bit loop). Integers are unsigned:
q_u = q + 2**(bits-1), and a symmetric scheme has zero 2**(bits-1), as in auto-gptq.

Zero points are stored minus one ("checkpoint_format": "gptq", GPTQModel's name for it,
the v1 format). auto-gptq's packer wrote ``zeros - 1`` and every reader of this layout
(auto-gptq, transformers/optimum, vLLM, ExLlama; GPTQModel converts it to its internal v2 on
load) adds the one back, so writing the true zeros would shift every weight by one step.
We mask like auto-gptq's reference dequantizer, ((stored + 1) & maxq), so even a zero point
of 0 (asymmetric only) round-trips.

The names keep our factor structure (``q_proj.svd_u.qweight``): an auto-gptq loader for
the stock architecture would look for ``q_proj.qweight``. ``svdllm.ranks`` in config.json
says how to rebuild the structure.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from loguru import logger

from svdllm_plugin.atomic import atomic_output_dir
from svdllm_plugin.checkpoint.format import CONFIG_KEY, GPTQ, make_record
from svdllm_plugin.export.integers import QuantizedWeight, quantized_weights

__all__ = [
    "export_gptq",
    "pack_gptq_linear",
    "unpack_gptq_linear",
    "unpack_gptq_integers",
    "gptq_quantize_config",
]


def export_gptq(
    model,
    output_dir,
    tokenizer=None,
    overwrite: bool = False,
    damp_percent: float = 0.01,
) -> Path:
    """Write ``model`` (after oneshot with a GPTQModifier) as an auto-gptq style checkpoint.

    Every quantized Linear must share one bits / group size / symmetry: quantize_config.json
    has a single value for each. Tensors that are not quantized keep the model's dtype.
    ``damp_percent`` is only recorded (the value GPTQ ran with is not kept on the model).
    """
    qweights = quantized_weights(model)
    if not qweights:
        raise ValueError("model has no quantized Linears; run oneshot with a GPTQModifier recipe first")
    schemes = {(qw.bits, qw.symmetric) for qw in qweights.values()}
    group_size = _common_group_size(qweights)
    if len(schemes) > 1 or group_size is None:
        found = sorted({(qw.bits, qw.group_size, qw.symmetric) for qw in qweights.values()})
        raise ValueError(
            f"auto-gptq's quantize_config.json holds one (bits, group_size, sym) per model; got {found}. "
            "Quantize every Linear with one scheme, or save compressed-tensors with "
            "checkpoint.save_pretrained"
        )
    bits, sym = schemes.pop()
    quantize_config = gptq_quantize_config(bits, group_size, sym, damp_percent)

    state = _unquantized_tensors(model, set(qweights))
    for name, qw in qweights.items():
        bias = getattr(model.get_submodule(name), "bias", None)
        tensors = pack_gptq_linear(qw, bias, name=name)
        state.update({f"{name}.{key}": tensor for key, tensor in tensors.items()})

    config = model.config.to_dict()
    config["quantization_config"] = quantize_config
    config[CONFIG_KEY] = make_record(model, GPTQ)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        from safetensors.torch import save_file

        weights_file = tmp / f"{quantize_config['model_file_base_name']}.safetensors"
        save_file(state, weights_file, metadata={"format": "pt"})
        (tmp / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info(
        "Exported {} GPTQ Linears ({}-bit, group {}) to {}", len(qweights), bits, group_size, output_dir
    )
    return Path(output_dir)


def gptq_quantize_config(bits: int, group_size: int, sym: bool, damp_percent: float = 0.01) -> dict:
    """auto-gptq's quantize_config.json (also transformers' quantization_config for gptq)."""
    return {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": damp_percent,
        "desc_act": False,  # compressed-tensors groups are contiguous columns: g_idx = i // group_size
        "static_groups": False,
        "sym": sym,
        # llmcompressor calibrates all Linears of a decoder layer on one pass of its inputs, not
        # auto-gptq's sub-module by sub-module order; recorded as is, no loader reads it
        "true_sequential": False,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",  # v1: qzeros hold zero - 1 (see module docstring)
    }


def pack_gptq_linear(qw: QuantizedWeight, bias: torch.Tensor | None = None, name: str = "Linear") -> dict:
    """The auto-gptq tensors of one Linear from its compressed-tensors integers."""
    m, n = qw.q.shape
    if n % 32 or m % 32:
        raise ValueError(
            f"{name}: auto-gptq packs 32 values per run, so both dims must be multiples of 32; "
            f"got ({m}, {n}). Choose ranks that are multiples of 32 or leave this module unquantized"
        )
    offset, maxq = 2 ** (qw.bits - 1), 2**qw.bits - 1
    q_u = qw.q.to(torch.int64) + offset  # (m, n) in [0, maxq]
    zero_u = (
        torch.full(qw.scale.shape, offset, dtype=torch.int64)
        if qw.symmetric
        else qw.zero_point.to(torch.int64) + offset
    )  # (m, G)
    out = {
        "qweight": _pack_int32(q_u.t(), qw.bits),  # (n * bits / 32, m)
        "qzeros": _pack_int32((zero_u - 1) & maxq, qw.bits).t().contiguous(),  # (G, m * bits / 32)
        "scales": qw.scale.t().to(torch.float16).contiguous(),  # (G, m)
        "g_idx": (torch.arange(n) // qw.group_size).to(torch.int32),
    }
    if bias is not None:
        out["bias"] = bias.detach().to(torch.float16)
    return out


def unpack_gptq_linear(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """The dequantized float32 weight (m, n) of an auto-gptq Linear: scales * (q - zeros)."""
    q_u, zeros = unpack_gptq_integers(qweight, qzeros, bits)  # (m, n), (G, m)
    g = g_idx.long()
    return (q_u - zeros.t()[:, g]).to(torch.float32) * scales.t()[:, g].to(torch.float32)


def unpack_gptq_integers(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned integers (m, n) and the true zero points (G, m) of an auto-gptq Linear."""
    q_u = _unpack_int32(qweight, bits).t()  # (m, n)
    zeros = (_unpack_int32(qzeros.t(), bits).t() + 1) & (2**bits - 1)  # (G, m); v1 stores zero - 1
    return q_u, zeros


def _pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers (L, C) along dim 0 into int32 (L * bits / 32, C)."""
    L, C = values.shape
    runs = values.to(torch.int64).reshape(L // 32, 32, C)
    words = torch.zeros(L // 32, bits, C, dtype=torch.int64)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        words[:, word] |= (runs[:, j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the high bits spill into the next word
            words[:, word + 1] |= runs[:, j] >> (32 - shift)
    words = words.reshape(L // 32 * bits, C)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # reinterpret as signed


def _unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``_pack_int32``: int32 (W, C) -> unsigned int64 (W * 32 / bits, C)."""
    W, C = packed.shape
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(W // bits, bits, C)
    mask = 2**bits - 1
    runs = torch.zeros(W // bits, 32, C, dtype=torch.int64)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        runs[:, j] = words[:, word] >> shift
        if shift + bits > 32:
            runs[:, j] |= words[:, word + 1] << (32 - shift)
    return (runs & mask).reshape(W // bits * 32, C)


def _common_group_size(qweights: dict[str, QuantizedWeight]) -> int | None:
    """The one auto-gptq group_size that describes every module (-1: per channel), else None.

    A module with a single group fits both its own width and -1, so only modules with
    several groups decide; the single-group ones must then be exactly one group wide.
    """
    sizes = {qw.group_size for qw in qweights.values() if qw.scale.shape[1] > 1}
    if not sizes:
        return -1
    if len(sizes) > 1:
        return None
    (size,) = sizes
    single = [qw for qw in qweights.values() if qw.scale.shape[1] == 1]
    return size if all(qw.q.shape[1] == size for qw in single) else None


def _unquantized_tensors(model, quantized: set[str]) -> dict[str, torch.Tensor]:
    """The model's other tensors (embeddings, norms, dense Linears); a tied copy is written once."""
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if key.rpartition(".")[0] in quantized:
            continue
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = tensor.detach().contiguous()
    return out
