"""Random-weight models at real shapes, dense and factorized, for `svdllm bench --synthetic`.

Speed depends on shapes, not on weight values: a model built from a named shape
(``llama-7b``, ``llama-13b``, ``smollm2-135m``) or from an HF config.json, with random
weights made directly in the target dtype on the target device, shows the speedup of the
factorized model on any hardware without downloading weights or calibrating.

Each decoder-layer Linear (q/k/v/o, gate/up/down) is replaced by the factorized module a
compressed folder builds when stock transformers loads it (``SVDLinear`` of
``checkpoint/modeling_svdllm.py``: ``svd_u(svd_v(x))``), at the ranks ``SVDLLMModifier``
chooses for a uniform ratio (``round_ranks``: one budget, ranks a multiple of
``rank_multiple``; a matrix whose rank saves nothing stays dense).

Only torch and transformers are needed (a GPU machine without llmcompressor, compressed-tensors
or pydantic runs it): the two plugin files used are loaded by path when their packages'
imports (llmcompressor) are missing.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

__all__ = ["SHAPES", "synthetic_config", "build_dense", "factorize_uniform", "decoder_parameters"]

_PACKAGE = Path(__file__).resolve().parents[1]  # svdllm_plugin/

# public configs (config.json of the published checkpoints), the fields that set the shapes
SHAPES: dict[str, dict] = {
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.lru_cache(maxsize=None)
def _load_file(relative: str, name: str):
    """A plugin file as a module of its own (its package's ``__init__`` may need llmcompressor)."""
    spec = importlib.util.spec_from_file_location(name, _PACKAGE / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _svd_linear_class() -> type:
    return _load_file("checkpoint/modeling_svdllm.py", "_svdllm_synthetic_modeling").SVDLinear


def _rank_functions():
    # the package would import llmcompressor (seconds; absent on a bare GPU machine): the plain
    # math file alone needs torch and loguru
    decompose = sys.modules.get("svdllm_plugin.modifiers.svd.decompose") or _load_file(
        "modifiers/svd/decompose.py", "_svdllm_synthetic_decompose"
    )
    return decompose.round_ranks, decompose.saves_parameters


def synthetic_config(name_or_path: str, layers: int | None = None):
    """A transformers config from a named shape or a config.json path; ``layers`` overrides the depth."""
    from transformers import AutoConfig, LlamaConfig

    if name_or_path in SHAPES:
        config = LlamaConfig(**SHAPES[name_or_path])
    else:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"--synthetic takes one of {sorted(SHAPES)} or a path to an HF config.json; "
                f"got {name_or_path!r}"
            )
        config = AutoConfig.for_model(**json.loads(path.read_text()))
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be a positive integer; got {layers}")
        config.num_hidden_layers = layers
        for key in ("layer_types", "mlp_layer_types"):  # per-layer lists some configs carry
            if isinstance(getattr(config, key, None), list):
                setattr(config, key, getattr(config, key)[:layers])
    return config


def build_dense(config, dtype: torch.dtype, device, seed: int = 0) -> nn.Module:
    """A random causal LM, built directly in ``dtype`` on ``device`` (no fp32 copy on the way)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    layers = model.get_decoder().layers
    prefix = f"{model.base_model_prefix}.layers." if hasattr(model, "base_model_prefix") else "layers."
    return [
        (f"{prefix}{name}", module)
        for name, module in layers.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    ]


def decoder_parameters(model: nn.Module) -> int:
    """Parameters of the decoder layers (the weights every decoded token reads)."""
    return sum(p.numel() for p in model.get_decoder().layers.parameters())


def factorize_uniform(
    model: nn.Module, ratio: float, rank_multiple: int = 64, seed: int = 0
) -> dict[str, int]:
    """Replace, in place, every decoder-layer Linear by random factors at ``ratio``; {name: rank}.

    Ranks: ``round_ranks`` over all of them with one budget (what ``SVDLLMModifier`` does for a
    uniform ratio); a matrix whose rank saves no parameters stays dense. The factors are random
    (kaiming-uniform like any fresh Linear), in the model's dtype and on its device.
    """
    round_ranks, saves_parameters = _rank_functions()
    SVDLinear = _svd_linear_class()
    targets = _targets(model)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no decoder-layer Linears named {TARGETS}")
    ranks = round_ranks([(m.out_features, m.in_features, ratio) for _, m in targets], rank_multiple)
    torch.manual_seed(seed)
    chosen = {}
    for (name, linear), k in zip(targets, ranks):
        m, n = linear.out_features, linear.in_features
        if not saves_parameters(m, n, k):
            continue
        W = linear.weight
        layer = SVDLinear(n, m, k, bias=linear.bias is not None, device=W.device, dtype=W.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        chosen[name] = k
    return chosen
