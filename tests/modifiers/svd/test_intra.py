"""``intra_layer``: each Linear's statistics see the compressed Linears before it in its decoder layer."""

from __future__ import annotations

import pytest
import torch
from support import run_oneshot
from torch import nn
from transformers import AutoModelForCausalLM

from svdllm_plugin.layers import SVDLinear
from svdllm_plugin.modifiers.svd import SVDLLMModifier, passes


@pytest.fixture(scope="module")
def two_layers(tiny_dir):
    """The conftest's saved 2-layer tiny Llama (hidden 64, GQA)."""
    return tiny_dir


def _loader(calib):
    return [
        {k: torch.tensor([calib[i][k]]) for k in ("input_ids", "attention_mask")} for i in range(len(calib))
    ]


def _spy_statistics(model, calib, modifier) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Run oneshot; the propagated X X^T each module was factorized with, and how many layer-input
    batches the modifier held after each decoder layer's epoch."""
    seen: dict[str, torch.Tensor] = {}
    held: list[int] = []
    factors, epoch_end = SVDLLMModifier._factors, SVDLLMModifier.on_sequential_epoch_end

    def spy(self, name, whitened):
        seen[name] = self._collector.get(self._layers[name]).H.clone()
        return factors(self, name, whitened)

    def after_epoch(self, *args, **kwargs):
        epoch_end(self, *args, **kwargs)
        held.append(len(self._inputs.held) if self._inputs is not None else 0)

    SVDLLMModifier._factors, SVDLLMModifier.on_sequential_epoch_end = spy, after_epoch
    try:
        run_oneshot(model, calib, modifier)
    finally:
        SVDLLMModifier._factors, SVDLLMModifier.on_sequential_epoch_end = factors, epoch_end
    return seen, held


def _dense_with(dense: nn.Module, compressed: nn.Module, names: list[str]) -> nn.Module:
    """``dense`` with the given Linears' weights replaced by the compressed model's W_u W_v."""
    modules = dict(compressed.named_modules())
    with torch.no_grad():
        for name in names:
            dense.get_submodule(name).weight.copy_(modules[name].dense())
    return dense


@pytest.mark.parametrize(
    "settings", [dict(update="input"), dict(activations="propagated")], ids=["update", "propagated"]
)
def test_statistics_see_the_compressed_linears_before_them_in_the_layer(two_layers, calib, settings):
    """Layer 0's o_proj is factorized with exactly the X X^T of its inputs when q/k/v (and only
    they) are replaced by their final factors; down_proj with q..up replaced; without
    intra_layer, layer 0's o_proj sees the dense model's inputs."""
    model = AutoModelForCausalLM.from_pretrained(two_layers)
    seen, held = _spy_statistics(model, calib, SVDLLMModifier(ratio=0.5, intra_layer=True, **settings))
    assert held and max(held) == 0, held  # the layer's inputs are dropped at its epoch end
    prefix = "model.layers.0."
    stages = {
        "self_attn.o_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "mlp.down_proj": [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ],
    }
    for target, before in stages.items():
        dense = _dense_with(
            AutoModelForCausalLM.from_pretrained(two_layers), model, [prefix + n for n in before]
        )
        linear = dense.get_submodule(prefix + target)
        expected = passes.collect_statistics(dense, {target: linear}, _loader(calib)).get(linear).H
        torch.testing.assert_close(
            seen[prefix + target], expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item()
        )

    plain, _ = _spy_statistics(
        AutoModelForCausalLM.from_pretrained(two_layers), calib, SVDLLMModifier(ratio=0.5, **settings)
    )
    original = AutoModelForCausalLM.from_pretrained(two_layers)
    o_proj = original.get_submodule(prefix + "self_attn.o_proj")
    dense_H = passes.collect_statistics(original, {"o": o_proj}, _loader(calib)).get(o_proj).H
    torch.testing.assert_close(
        plain[prefix + "self_attn.o_proj"], dense_H, rtol=1e-5, atol=1e-6 * dense_H.abs().max().item()
    )
    assert not torch.allclose(seen[prefix + "self_attn.o_proj"], dense_H, rtol=1e-3)
    assert all(isinstance(model.get_submodule(prefix + n), SVDLinear) for n in stages["mlp.down_proj"])


def test_intra_layer_needs_propagation():
    with pytest.raises(ValueError, match="activations: propagated"):
        SVDLLMModifier(intra_layer=True)
    with pytest.raises(ValueError, match="update: input"):
        SVDLLMModifier(intra_layer=True, update="output")
    assert SVDLLMModifier(intra_layer=True, update="input").intra_layer


def test_two_decoder_layers_in_one_subgraph_are_replayed_each(two_layers, calib):
    """With ``sequential_targets_per_subgraph: 2`` both decoder layers end their epoch together:
    each is replayed on its own held inputs (layer 1's came from the still-dense layer 0)."""
    from llmcompressor import oneshot

    import svdllm_plugin  # noqa: F401

    seen: dict[str, torch.Tensor] = {}
    factors = SVDLLMModifier._factors

    def spy(self, name, whitened):
        seen[name] = self._collector.get(self._layers[name]).H.clone()
        return factors(self, name, whitened)

    model = AutoModelForCausalLM.from_pretrained(two_layers)
    SVDLLMModifier._factors = spy
    try:
        oneshot(
            model=model,
            dataset=calib,
            recipe=SVDLLMModifier(ratio=0.5, intra_layer=True, activations="propagated"),
            num_calibration_samples=len(calib),
            max_seq_length=len(calib[0]["input_ids"]),
            sequential_targets_per_subgraph=2,
        )
    finally:
        SVDLLMModifier._factors = factors
    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    for i in (0, 1):
        prefix = f"model.layers.{i}."
        dense = _dense_with(
            AutoModelForCausalLM.from_pretrained(two_layers), model, [prefix + n for n in qkv]
        )
        linear = dense.get_submodule(prefix + "self_attn.o_proj")
        expected = passes.collect_statistics(dense, {"o": linear}, _loader(calib)).get(linear).H
        got = seen[prefix + "self_attn.o_proj"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
