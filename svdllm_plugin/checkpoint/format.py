"""The on-disk format of a factorized checkpoint, defined once.

A compressed folder is a stock transformers folder (config.json + safetensors) whose
config.json says how to rebuild the factor structure, under the key ``svdllm``:

    "model_type": "svdllm",                      # stock loaders without the modeling file refuse it
    "architectures": ["SVDLLMForCausalLM"],
    "auto_map": {"AutoConfig": "modeling_svdllm.SVDLLMConfig",
                 "AutoModel": "modeling_svdllm.LlamaModel", ...},  # the factorized base classes
    "svdllm": {
        "version": "0.x",                        # the plugin that wrote it
        "format": "dense" | "packed" | "gptq",   # float factors, compressed-tensors pack-quantized,
                                                 # or the auto-gptq layout of svdllm_plugin.export
        "base_model_type": "llama",              # the architecture the factors live in
        "base_architectures": ["LlamaForCausalLM"],
        "ranks": {"model.layers.0.self_attn.q_proj": 64, ...},
        "compensation": {"model.layers.0.mlp.up_proj": 16, ...},  # only when present: Linears
                                                 # wrapped as base + lowrank_l(lowrank_r(x))
        ... (extra: what the run measured, e.g. ppl_before / ppl_after)
    }

``modeling_svdllm.py`` (and ``svdllm_runtime.py``) are copied into the folder so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it without the
plugin. Folders written before this format (model_type of the base, no ``format``) still load
through :func:`svdllm_plugin.checkpoint.load_pretrained`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from svdllm_plugin.layers import compensated_ranks, factorized_ranks
from svdllm_plugin.version import __version__

__all__ = [
    "CONFIG_KEY",
    "MODEL_TYPE",
    "DENSE",
    "PACKED",
    "GPTQ",
    "MODELING_FILES",
    "make_record",
    "read_config",
    "record_format",
    "base_config",
    "write_config",
    "register_auto_config",
    "tied_keys",
    "read_safetensors",
]

CONFIG_KEY = "svdllm"
MODEL_TYPE = "svdllm"
DENSE, PACKED, GPTQ = "dense", "packed", "gptq"  # gptq: svdllm_plugin.export.gptq, not loaded here
# copied into each folder: {name in the folder: source, relative to the svdllm_plugin package}
MODELING_FILES = {
    "modeling_svdllm.py": "checkpoint/modeling_svdllm.py",
    "svdllm_runtime.py": "checkpoint/svdllm_runtime.py",
    "svdllm_fused.py": "inference/fused.py",  # torch + transformers only, like the two above
    "svdllm_latent_cache.py": "inference/latent_cache.py",
    "svdllm_graph.py": "inference/graph.py",
}


def make_record(model, fmt: str, extra: dict | None = None) -> dict:
    """The ``svdllm`` entry of config.json for ``model`` (its SVDLinear ranks, its architecture)."""
    if fmt not in (DENSE, PACKED, GPTQ):
        raise ValueError(f"format must be {DENSE!r}, {PACKED!r} or {GPTQ!r}; got {fmt!r}")
    config = model.config
    base_type = config.model_type
    if base_type == MODEL_TYPE:  # a model loaded from a compressed folder keeps its record's base
        base_type = getattr(config, CONFIG_KEY)["base_model_type"]
    record = {
        **(extra or {}),
        "version": __version__,
        "format": fmt,
        "base_model_type": base_type,
        "base_architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "ranks": factorized_ranks(model),
    }
    compensation = compensated_ranks(model)
    if compensation:  # {Linear name: rank} of its low-rank quantization-error term (CompensatedLinear)
        record["compensation"] = compensation
    return record


def read_config(folder) -> dict:
    """config.json of ``folder`` as a dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a model folder")
    return json.loads(path.read_text())


def record_format(config_dict: dict) -> str:
    """``dense`` or ``packed``; folders without a ``format`` tell by their quantization_config."""
    record = config_dict.get(CONFIG_KEY) or {}
    return record.get("format") or (PACKED if config_dict.get("quantization_config") else DENSE)


def base_config(folder):
    """The base architecture's transformers config of a factorized folder (``svdllm`` kept on it)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_dict = read_config(folder)
    if config_dict.get("model_type") != MODEL_TYPE:  # a folder of the earlier layout
        return AutoConfig.from_pretrained(folder)
    base_type = config_dict[CONFIG_KEY]["base_model_type"]
    for key in ("auto_map", "architectures"):  # the base model's own entries, not ours
        config_dict.pop(key, None)
    config_dict["architectures"] = config_dict[CONFIG_KEY].get("base_architectures") or None
    config = CONFIG_MAPPING[base_type].from_dict(dict(config_dict, model_type=base_type))
    config._name_or_path = str(folder)
    return config


def write_config(folder: Path, record: dict, dtype: torch.dtype | None = None) -> None:
    """Put ``record`` and the stock-loading entries into ``folder``/config.json; copy the modeling files.

    Written into the saved file itself: llmcompressor's save wrapper and transformers both
    rewrite config.json from the model's config object, which does not carry our keys reliably.
    ``dtype``: the float dtype the tensors were written in (config.json ``dtype``, which
    ``from_pretrained(dtype="auto")`` loads them as).
    """
    from svdllm_plugin.checkpoint.modeling_svdllm import auto_map  # the one rule for the class names

    folder = Path(folder)
    config = read_config(folder)
    config.pop(CONFIG_KEY, None)
    config.update(
        model_type=MODEL_TYPE,
        architectures=["SVDLLMForCausalLM"],
        auto_map=auto_map(record["base_model_type"]),
    )
    config[CONFIG_KEY] = record
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    package = Path(__file__).parents[1]
    for name, source in MODELING_FILES.items():
        shutil.copyfile(package / source, folder / name)


def register_auto_config() -> None:
    """Let ``AutoConfig`` read a compressed folder's config.json in this process without remote code.

    Without it, every ``AutoConfig`` / ``AutoTokenizer.from_pretrained(folder)`` asks whether to
    run the folder's code (``model_type`` svdllm is unknown). Registered lazily, by the loader,
    so that importing the plugin changes nothing in transformers. The class only carries the
    keys; the model itself is built from :func:`base_config`. ``AutoModel`` /
    ``AutoModelForCausalLM`` map it to the package's own copy of the folder's entry classes
    (they convert it to the base config): the folder's auto_map names the factorized base classes
    (``LlamaForCausalLM``, whose ``config_class`` transformers would find inconsistent with this
    carrier), and in this process the plugin's code is the folder's code.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from svdllm_plugin.checkpoint.modeling_svdllm import SVDLLMForCausalLM, SVDLLMModel

    if MODEL_TYPE in CONFIG_MAPPING:
        return

    class SVDLLMFolderConfig(PretrainedConfig):
        model_type = MODEL_TYPE

    AutoConfig.register(MODEL_TYPE, SVDLLMFolderConfig, exist_ok=True)
    AutoModel.register(SVDLLMFolderConfig, SVDLLMModel, exist_ok=True)
    AutoModelForCausalLM.register(SVDLLMFolderConfig, SVDLLMForCausalLM, exist_ok=True)


def tied_keys(model) -> set[str]:
    """Tensors a checkpoint may omit because they share storage with another (tied embeddings)."""
    text_config = model.config.get_text_config()
    tied = getattr(model.config, "tie_word_embeddings", False) or getattr(
        text_config, "tie_word_embeddings", False
    )
    return {"lm_head.weight"} if tied else set()


def read_safetensors(folder) -> dict[str, torch.Tensor]:
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
