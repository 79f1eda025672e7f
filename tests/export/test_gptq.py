"""auto-gptq layout export: packing checked against auto-gptq's own loop, and a model round trip.

The model test runs one oneshot (4-bit symmetric, group 64, every Linear but lm_head) on the
tiny factorized Llama of test_quantized (conftest's tiny_factory, hidden 128), exports it, and
unpacks every Linear again.
"""

import json

import numpy as np
import pytest
import torch
from support.factors import factor_model

from svdllm_plugin.checkpoint import read_safetensors
from svdllm_plugin.export import (
    QuantizedWeight,
    export_gptq,
    pack_gptq_linear,
    quantized_weights,
    unpack_gptq_integers,
    unpack_gptq_linear,
)


def auto_gptq_pack_qweight(intweight: np.ndarray, bits: int) -> np.ndarray:
    """auto-gptq 0.7 QuantLinear.pack (qlinear_cuda_old), transcribed: (n, m) uint32 -> qweight."""
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # bits == 3
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight


def random_qweight(bits, symmetric, m=64, n=128, group_size=32, scale_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    q = torch.randint(lo, hi, (m, n), generator=g).to(torch.int8)
    scale = (torch.rand(m, n // group_size, generator=g) * 0.01 + 1e-3).to(scale_dtype)
    zero_point = None if symmetric else torch.randint(lo, hi, scale.shape, generator=g).to(torch.int8)
    return QuantizedWeight(q, scale, zero_point, bits, group_size)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_auto_gptq(bits, symmetric):
    qw = random_qweight(bits, symmetric)
    tensors = pack_gptq_linear(qw)
    offset = 2 ** (bits - 1)
    q_u = (qw.q.to(torch.int64) + offset).t().numpy().astype(np.uint32)  # (n, m), as auto-gptq holds it
    expected = auto_gptq_pack_qweight(q_u, bits).view(np.int32)
    assert tensors["qweight"].dtype == torch.int32
    assert np.array_equal(tensors["qweight"].numpy(), expected)
    zeros = torch.full(qw.scale.shape, offset) if symmetric else qw.zero_point.to(torch.int64) + offset
    stored = ((zeros - 1) & (2**bits - 1)).numpy().astype(np.uint32)  # (m, G): v1 stores zero - 1
    assert np.array_equal(tensors["qzeros"].numpy(), auto_gptq_pack_qweight(stored, bits).view(np.int32).T)
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (4, 64)
    assert torch.equal(tensors["g_idx"], torch.arange(128, dtype=torch.int32) // 32)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_round_trip(bits, symmetric):
    """A bf16 model's scales survive fp16 storage, so its weights come back bit-exact."""
    qw = random_qweight(bits, symmetric, scale_dtype=torch.bfloat16)
    t = pack_gptq_linear(qw)
    q_u, zeros = unpack_gptq_integers(t["qweight"], t["qzeros"], bits)
    assert torch.equal(q_u, qw.q.to(torch.int64) + 2 ** (bits - 1))
    W = unpack_gptq_linear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)  # float32, exact product
    assert torch.equal(W, qw.dequantize(scale=qw.scale.float()))
    assert torch.equal(W.to(torch.bfloat16), qw.dequantize())  # the model's own bf16 weight


def test_zero_point_zero_survives_the_minus_one():
    """An asymmetric zero of 0 is stored as -1 & maxq; the reader's (+1) & maxq gives 0 back."""
    qw = random_qweight(4, symmetric=False)
    qw.zero_point.fill_(-8)  # unsigned zero 0
    t = pack_gptq_linear(qw)
    zeros = unpack_gptq_integers(t["qweight"], t["qzeros"], 4)[1]
    assert torch.equal(zeros, torch.zeros(4, 64, dtype=torch.int64))
    W = unpack_gptq_linear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)
    assert torch.equal(W, qw.dequantize(scale=qw.scale.half().float()))


def test_pack_rejects_dims_that_are_not_multiples_of_32():
    qw = random_qweight(4, True, m=48, n=128)
    with pytest.raises(ValueError, match="multiples of 32"):
        pack_gptq_linear(qw, name="x.svd_u")


@pytest.fixture(scope="module")
def quantized_model(tmp_path_factory, tiny_factory, tokenizer, calib):
    from llmcompressor.modifiers.quantization import GPTQModifier
    from support import run_oneshot

    model = factor_model(tiny_factory, tokenizer, tmp_path_factory.mktemp("dense"))
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["re:.*lm_head"]
    )
    return run_oneshot(model, calib, recipe)


def test_export_round_trip(quantized_model, tmp_path):
    model = quantized_model
    folder = export_gptq(model, tmp_path / "gptq")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["config.json", "model.safetensors", "quantize_config.json"]
    quantize_config = json.loads((folder / "quantize_config.json").read_text())
    assert quantize_config | {"damp_percent": None} == {
        "bits": 4,
        "group_size": 64,
        "damp_percent": None,
        "desc_act": False,
        "static_groups": False,
        "sym": True,
        "true_sequential": False,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == quantize_config
    assert config["svdllm"]["ranks"]["model.layers.0.mlp.down_proj"] == 64

    state = read_safetensors(folder)
    qweights = quantized_weights(model)
    assert len(qweights) == 22
    for name, qw in qweights.items():
        t = {k: state[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert t["qzeros"].unique().tolist() == [0x77777777]  # symmetric 4-bit: zero 8, stored 7
        W = unpack_gptq_linear(**t, bits=4)
        weight = model.get_submodule(name).weight.data  # what the model computes with
        # exact up to the fp16 storage of the scales, which auto-gptq's format prescribes
        assert torch.equal(W, qw.dequantize(scale=qw.scale.half().float()))
        torch.testing.assert_close(W, weight, rtol=2**-11, atol=0)
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert "lm_head.weight" not in state  # tied
    assert "model.layers.0.self_attn.q_proj.svd_u.weight" not in state


def test_export_refuses_mixed_schemes(quantized_model, tmp_path):
    module = quantized_model.model.layers[0].self_attn.k_proj
    scheme = module.quantization_scheme
    weights = scheme.weights.model_copy(update={"num_bits": 8})
    module.quantization_scheme = scheme.model_copy(update={"weights": weights})
    try:
        with pytest.raises(ValueError, match="one \\(bits, group_size, sym\\) per model"):
            export_gptq(quantized_model, tmp_path / "gptq")
    finally:
        module.quantization_scheme = scheme
    assert not (tmp_path / "gptq").exists()


def test_integers_read_the_same_from_a_compressed_model(quantized_model, tmp_path):
    """A packed save leaves the model compressed until its next forward; export must still work."""
    from compressed_tensors.quantization import QuantizationStatus

    from svdllm_plugin.checkpoint import save_pretrained

    before = quantized_weights(quantized_model)
    save_pretrained(quantized_model, tmp_path / "ct")
    assert quantized_model.model.layers[0].mlp.gate_proj.quantization_status == QuantizationStatus.COMPRESSED
    after = quantized_weights(quantized_model)
    for name, qw in before.items():
        assert torch.equal(after[name].q, qw.q) and torch.equal(after[name].scale, qw.scale)
