"""HF-format save / load of factorized models: safetensors + config.json, no pickles.

config.json carries, under the key ``svdllm``, what is needed to rebuild the model:
the rank of every factorized module and the plugin version. The loader builds the
architecture from config, swaps in SVDLinear of those ranks, then loads the weights, so
a model with only some modules factorized reloads bit-identically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from svdllm_plugin.atomic import atomic_output_dir
from svdllm_plugin.layers import SVDLinear, factorized_ranks, replace_module
from svdllm_plugin.version import __version__

__all__ = ["CONFIG_KEY", "save_pretrained", "load_pretrained", "factorize_structure"]

CONFIG_KEY = "svdllm"


def save_pretrained(
    model, output_dir, tokenizer=None, overwrite: bool = False, extra: dict | None = None
) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``output_dir`` atomically.

    Refuses pending (not yet calibrated) layers: they would save placeholder factors.
    """
    pending = [n for n, m in model.named_modules() if isinstance(m, SVDLinear) and m.pending]
    if pending:
        raise RuntimeError(f"{len(pending)} SVDLinear layers were never calibrated (e.g. {pending[0]})")
    ranks = factorized_ranks(model)
    info = {"version": __version__, "ranks": ranks, **(extra or {})}
    setattr(model.config, CONFIG_KEY, info)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # llmcompressor's save_pretrained rewrites config.json from the original model's
        # file, dropping extra keys: write ours into the saved file itself
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        config[CONFIG_KEY] = info
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("Saved {} factorized modules to {}", len(ranks), output_dir)
    return Path(output_dir)


def factorize_structure(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace the named Linears by (uninitialised) SVDLinear of the given ranks."""
    for name, k in ranks.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"checkpoint names {name} as factorized but the model has {type(linear).__name__}"
            )
        W = linear.weight
        layer = SVDLinear(
            linear.in_features,
            linear.out_features,
            k,
            bias=linear.bias is not None,
            device=W.device,
            dtype=W.dtype,
        )
        replace_module(model, name, layer)


def load_pretrained(path, dtype: torch.dtype = torch.float32, **kwargs):
    """Load a dense HF folder or hub id, or rebuild a factorized checkpoint of this plugin."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = str(path)
    config = AutoConfig.from_pretrained(path)
    info = getattr(config, CONFIG_KEY, None)
    if not info:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"factorized checkpoints load from a local folder; {path} is not one")
    if getattr(config, "quantization_config", None):
        from svdllm_plugin.quantized import load_quantized

        return load_quantized(folder, config, info["ranks"], dtype=dtype)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every parameter is overwritten by the checkpoint below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    factorize_structure(model, info["ranks"])
    missing, unexpected = model.load_state_dict(read_safetensors(folder), strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    model.eval()
    logger.info("Loaded {} factorized modules from {}", len(info["ranks"]), folder)
    return model


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    state = {}
    for file in files:
        if not (folder / file).exists():
            raise FileNotFoundError(f"checkpoint file {folder / file} is missing; the folder is incomplete")
        state.update(load_file(folder / file))
    return state


def _tied_keys(model) -> set[str]:
    if getattr(model.config, "tie_word_embeddings", False) or getattr(
        model.config.get_text_config(), "tie_word_embeddings", False
    ):
        return {"lm_head.weight"}
    return set()
