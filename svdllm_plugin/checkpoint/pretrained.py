"""``save_pretrained`` / ``load_pretrained``: one entry point for dense and packed factor checkpoints.

Both directions choose the format by the same rule: a model with compressed-tensors
quantization schemes (after oneshot with a GPTQModifier) is ``packed``, any other is
``dense``; the choice is recorded in config.json (``svdllm.format``) and read back from there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from svdllm_plugin.atomic import atomic_output_dir
from svdllm_plugin.checkpoint import format as fmt
from svdllm_plugin.checkpoint.bits import checkpoint_bits
from svdllm_plugin.checkpoint.card import write_model_card
from svdllm_plugin.checkpoint.packed import is_quantized, load_packed_weights, save_packed
from svdllm_plugin.layers import CompensatedLinear, SVDLinear, factorized_ranks, replace_module

__all__ = [
    "save_pretrained",
    "load_pretrained",
    "factorize_structure",
    "compensate_structure",
    "SAVE_DTYPES",
    "check_save_dtype",
]

# --save-dtype: how the float tensors (embeddings, norms, lm_head, float factors, quantization scales)
# are stored; packed integers keep their own dtype. bf16 is what a deployment stores.
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def save_pretrained(
    model,
    output_dir,
    tokenizer=None,
    overwrite: bool = False,
    extra: dict | None = None,
    recipe: str | None = None,
    base_model: str | None = None,
    save_dtype: str | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``output_dir`` atomically, dense or packed.

    ``extra`` is stored in config.json's ``svdllm`` record (e.g. ``ppl_before``, ``ppl_after``)
    and shown in the model card; ``recipe`` (YAML text) is written as recipe.yaml (default:
    llmcompressor's active recipe, when one is there); ``base_model`` names the original model in
    the card (default: the model's ``name_or_path``). ``save_dtype`` (``bf16``, ``fp16``, ``fp32``;
    default None: the model's own dtypes) casts every float tensor as it is written, the model in
    memory is unchanged. Refuses pending (never calibrated) layers. The record gets the folder's
    byte and bits-per-weight accounting (:func:`svdllm_plugin.checkpoint.bits.checkpoint_bits`).
    """
    dtype = check_save_dtype(save_dtype)
    pending = [n for n, m in model.named_modules() if isinstance(m, SVDLinear) and m.pending]
    if pending:
        raise RuntimeError(f"{len(pending)} SVDLinear layers were never calibrated (e.g. {pending[0]})")
    ranks = factorized_ranks(model)
    kind = fmt.PACKED if is_quantized(model) else fmt.DENSE
    record = fmt.make_record(model, kind, extra)
    params = _parameter_counts(model)
    base_model = base_model or getattr(model.config, "_name_or_path", "") or "unknown"
    with atomic_output_dir(output_dir, overwrite) as tmp:
        if kind == fmt.PACKED:
            save_packed(model, tmp, cast=lambda state: _cast_floats(state, dtype))
        else:  # the class method: skips llmcompressor's wrapper
            type(model).save_pretrained(model, tmp, state_dict=_cast_floats(model.state_dict(), dtype))
        if dtype is not None:
            record["save_dtype"] = save_dtype
        record["size"] = checkpoint_bits(tmp, config=model.config)
        fmt.write_config(tmp, record, dtype=dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_recipe(tmp, recipe)
        write_model_card(tmp, record, base_model=base_model, params=params, name=Path(output_dir).name)
    logger.info("Saved {} factorized modules ({}) to {}", len(ranks), kind, output_dir)
    return Path(output_dir)


def check_save_dtype(save_dtype: str | None) -> torch.dtype | None:
    """The torch dtype of a ``--save-dtype`` name (None: keep the model's dtypes)."""
    if save_dtype is None:
        return None
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}; got {save_dtype!r}")
    return SAVE_DTYPES[save_dtype]


def _cast_floats(state: dict, dtype: torch.dtype | None) -> dict:
    """``state`` with its float tensors in ``dtype``; tensors that share storage (tied embeddings)
    still share it afterwards, so transformers drops the tied copy as before. Integer tensors (packed
    weights, zero points) and offloaded (meta) tensors are kept as they are."""
    if dtype is None:
        return state
    done: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, tensor in state.items():
        if (
            not isinstance(tensor, torch.Tensor)
            or not tensor.is_floating_point()
            or tensor.device.type == "meta"
        ):
            out[key] = tensor
            continue
        alias = (tensor.untyped_storage().data_ptr(), tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if alias not in done:
            done[alias] = tensor.detach().to(dtype)
        out[key] = done[alias]
    return out


def load_pretrained(path, dtype: torch.dtype = torch.float32, **kwargs):
    """Load a dense HF folder or hub id, or rebuild a factorized checkpoint of this plugin."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    folder = Path(path)
    config_dict = fmt.read_config(folder) if (folder / "config.json").is_file() else {}
    record = config_dict.get(fmt.CONFIG_KEY)
    if not record:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    fmt.register_auto_config()  # the tokenizer loaded next reads this config.json too
    kind = fmt.record_format(config_dict)
    if kind == fmt.GPTQ:
        raise ValueError(
            f"{folder} is an auto-gptq layout export (svdllm_plugin.export.gptq) for GPTQ runtimes; load the "
            "compressed-tensors folder it was exported from instead"
        )
    config = fmt.base_config(folder)
    with no_init_weights():  # every parameter is overwritten by the checkpoint below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    factorize_structure(model, record["ranks"])
    compensate_structure(model, record.get("compensation") or {})
    if kind == fmt.PACKED:
        load_packed_weights(model, folder)
        model.to(dtype)
    else:
        _load_dense_weights(model, folder)
    model.eval()
    logger.info("Loaded {} factorized modules from {}", len(record["ranks"]), folder)
    return model


def _replace_linears(model: nn.Module, ranks: dict[str, int], role: str, build) -> None:
    """Replace each named Linear by ``build(linear, rank)``; a name that is no Linear is an error."""
    for name, k in ranks.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"checkpoint names {name} as {role} but the model has {type(linear).__name__}")
        replace_module(model, name, build(linear, k))


def factorize_structure(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace the named Linears by (uninitialised) SVDLinear of the given ranks."""

    def build(linear: nn.Linear, k: int) -> SVDLinear:
        m, n, W = linear.out_features, linear.in_features, linear.weight
        return SVDLinear(n, m, k, bias=linear.bias is not None, device=W.device, dtype=W.dtype)

    _replace_linears(model, ranks, "factorized", build)


def compensate_structure(model: nn.Module, ranks: dict[str, int]) -> None:
    """Wrap the named Linears as (uninitialised) CompensatedLinear of the given ranks."""

    def build(linear: nn.Linear, r: int) -> CompensatedLinear:
        return CompensatedLinear(linear, r, device=linear.weight.device, dtype=linear.weight.dtype)

    _replace_linears(model, ranks, "compensated", build)


def _load_dense_weights(model: nn.Module, folder: Path) -> None:
    missing, unexpected = model.load_state_dict(fmt.read_safetensors(folder), strict=False)
    missing = [k for k in missing if k not in fmt.tied_keys(model)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()


def _parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters now, and of the dense model the factors replace (each SVDLinear counted as m x n).

    Weights and biases only: quantization adds ``weight_scale`` / ``weight_zero_point`` parameters,
    which are not parameters of the model in the usual sense.
    """
    named = {id(p): p for n, p in model.named_parameters() if n.rpartition(".")[2] in ("weight", "bias")}
    unique = named.values()
    after = sum(p.numel() for p in unique)
    layers = [m for m in model.modules() if isinstance(m, SVDLinear)]
    before = after + sum(
        m.in_features * m.out_features - m.rank * (m.in_features + m.out_features) for m in layers
    )
    dense_bytes = sum(p.numel() * p.element_size() for p in unique)
    dense_bytes += sum(
        (m.in_features * m.out_features - m.rank * (m.in_features + m.out_features))
        * m.svd_v.weight.element_size()
        for m in layers
    )
    return {"params_before": before, "params_after": after, "bytes_before": dense_bytes}


def _write_recipe(folder: Path, recipe: str | None) -> None:
    """recipe.yaml: the given text, or the recipe of llmcompressor's active session (if it was used)."""
    if recipe is not None:
        (folder / "recipe.yaml").write_text(recipe)
        return
    if "llmcompressor" not in sys.modules:  # never import it just to look
        return
    try:
        from llmcompressor.core import active_session

        session_recipe = active_session().lifecycle.recipe
        if session_recipe is not None and session_recipe.modifiers:
            session_recipe.yaml(file_path=str(folder / "recipe.yaml"))
    except Exception as error:  # a recipe that does not serialise must not lose the checkpoint
        logger.warning("recipe.yaml not written: {}", error)
