"""Real (packed) quantization of factorized models: compressed-tensors checkpoints, bitsandbytes.

After ``GPTQModifier`` has quantized the ``svd_u`` / ``svd_v`` children of every SVDLinear,
the in-memory model still holds float weights (GPTQ writes the dequantized values back, and
compressed-tensors fake-quantizes them again in every forward). ``save_quantized`` writes the
integers themselves: a compressed-tensors ``pack-quantized`` folder (``weight_packed`` int32,
``weight_scale``, ``weight_shape`` per Linear), which is what vLLM and transformers read.

transformers cannot load such a folder by itself: its model class has a dense ``q_proj`` where
the checkpoint has ``q_proj.svd_u``/``q_proj.svd_v``. ``load_quantized`` therefore builds the
architecture, swaps in SVDLinear of the saved ranks, and then runs the same steps as
transformers' compressed-tensors quantizer (attach schemes, load packed tensors, decompress).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from svdllm_plugin.atomic import atomic_output_dir
from svdllm_plugin.checkpoint import read_safetensors
from svdllm_plugin.layers import SVDLinear, factorized_ranks
from svdllm_plugin.version import __version__

__all__ = [
    "QuantizedWeight",
    "save_quantized",
    "load_quantized",
    "load_quantized_weights",
    "quantized_weights",
    "read_quantized_weights",
    "max_distinct_per_group",
    "read_safetensors",
    "to_bitsandbytes",
]

_CONFIG_KEY = "svdllm"  # the key svdllm_plugin.checkpoint reads the ranks from


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


def save_quantized(
    model, output_dir, tokenizer=None, overwrite: bool = False, extra: dict | None = None,
) -> Path:
    """Save a GPTQ-quantized factor model as a compressed-tensors pack-quantized folder.

    The three steps of llmcompressor's ``save_pretrained`` wrapper, called directly:
    compress in memory, transformers' save, add ``quantization_config`` to config.json.
    Not the wrapper itself: it re-writes config.json from the ORIGINAL model folder
    (dropping the ``svdllm`` ranks that rebuild the factor structure), and on a reloaded
    model it tries to parse the folder's recipe.yaml, which llmcompressor's own loader
    rejects (``could not determine a constructor for ...ActivationOrdering``).

    Side effect (compressed-tensors' design): the model's Linears are compressed in
    place and decompress again on the next forward pass; the values are unchanged.
    """
    from compressed_tensors.compressors import ModelCompressor

    _require_quantized(model)
    ranks = factorized_ranks(model)
    setattr(model.config, _CONFIG_KEY, {"version": __version__, "ranks": ranks, **(extra or {})})
    compressor = ModelCompressor.from_pretrained_model(model)  # int weight-only infers pack-quantized
    compressor.compress_model(model, skip_compressed=True)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        type(model).save_pretrained(model, tmp)  # the class method: skips an instance-level wrapper
        compressor.update_config(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("Saved packed quantized model ({} factorized modules) to {}", len(ranks), output_dir)
    return Path(output_dir)


def load_quantized(folder, config, ranks: dict[str, int], dtype: torch.dtype = torch.float32):
    """Rebuild a factorized model from ``config`` and load a pack-quantized folder into it."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from svdllm_plugin.checkpoint import factorize_structure

    with no_init_weights():  # every weight is overwritten by the checkpoint
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    factorize_structure(model, ranks)
    load_quantized_weights(model, folder)
    model.to(dtype)
    model.eval()
    return model


def load_quantized_weights(model: nn.Module, folder) -> nn.Module:
    """Load a compressed-tensors folder into ``model`` (SVDLinear structure already built).

    Follows transformers' CompressedTensorsHfQuantizer: attach the saved schemes, put the
    packed tensors on the modules, decompress. The weights end up as the dequantized
    values, which is what the in-memory model computes with after ``oneshot``.
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
            "written by save_quantized load back here. A GPTQ export is for other runtimes: read it with "
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
            raise ValueError(
                f"{folder} has no packed weight for {name}; save the model with save_quantized"
            )
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
    missing = [k for k in missing if k not in loaded and k not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(
            f"{folder} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    ModelCompressor(quantization_config=qconfig).decompress_model(model)
    if _tied_keys(model):
        model.tie_weights()
    modules = {k.rpartition(".")[0] for k in loaded}
    logger.info("Loaded {} packed quantized Linears from {}", len(modules), folder)
    return model


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """{module name: integers} of every quantized Linear of an in-memory model.

    Uses compressed-tensors' own ``quantize`` on the stored weight and qparams, the same
    call its packer makes, so the integers are the ones a saved checkpoint holds. Works
    before and after ``save_quantized`` (a compressed module is unpacked, not mutated).
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


def max_distinct_per_group(W: torch.Tensor, group_size: int) -> int:
    """Largest number of distinct values in any group of ``group_size`` consecutive columns."""
    groups = W.reshape(-1, group_size).sort(dim=1).values  # (m * n / g, g)
    return int(((groups[:, 1:] != groups[:, :-1]).sum(dim=1) + 1).max())


def to_bitsandbytes(model: nn.Module, mode: str = "nf4", skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear (the SVD factors included) by a bitsandbytes NF4 / int8 one.

    transformers' ``BitsAndBytesConfig`` path cannot be used on a factorized checkpoint:
    it quantizes while loading into the dense architecture, before our SVDLinear swap.
    Converting the loaded model by hand gives the same modules and runs on CPU.
    """
    import bitsandbytes as bnb

    if mode not in ("nf4", "int8"):
        raise ValueError(f"mode must be 'nf4' or 'int8'; got {mode!r}")
    names = [
        n for n, m in model.named_modules()
        if type(m) is nn.Linear and not any(n == s or n.endswith("." + s) for s in skip)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _bnb_linear(getattr(parent, child), mode, bnb))
    logger.info("Converted {} Linears to bitsandbytes {}", len(names), mode)
    return model


def _bnb_linear(linear: nn.Linear, mode: str, bnb) -> nn.Module:
    """One bitsandbytes Linear holding ``linear``'s weights; quantized by the ``.to`` call."""
    if hasattr(linear, "quantization_scheme"):
        raise ValueError(
            "this Linear is already quantized by compressed-tensors; convert a dense factor model"
        )
    W, bias = linear.weight.data, linear.bias
    device = W.device
    with torch.device("meta"):  # skip allocating and initialising a weight we replace
        if mode == "nf4":
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias is not None,
                                    compute_dtype=W.dtype, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias is not None,
                                      has_fp16_weights=False, threshold=0.0)
    if mode == "nf4":
        new.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4", module=new)
    else:
        new.weight = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.data, requires_grad=False)
    return new.to(device)


def _require_quantized(model: nn.Module) -> None:
    if not any(hasattr(m, "quantization_scheme") for m in model.modules()):
        raise ValueError(
            "model has no quantized modules; run oneshot with a GPTQModifier recipe before saving"
        )


def _tied_keys(model) -> set[str]:
    text_config = model.config.get_text_config()
    return {"lm_head.weight"} if getattr(text_config, "tie_word_embeddings", False) else set()
