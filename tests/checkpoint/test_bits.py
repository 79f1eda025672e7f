"""Honest bytes: bf16 saving (tied tensors stay tied, reloads equal the model rounded to bf16), and
the bits-per-decoder-Linear-weight accounting checked against hand-computed numbers on the tiny Llama.

The tiny Llama (hidden 64, intermediate 128, 4 heads / 2 KV heads of 16): per decoder layer q 64x64,
k 32x64, v 32x64, o 64x64, gate 128x64, up 128x64, down 64x128 = 36,864 weights; 2 layers 73,728.
"""

import copy
import json

import pytest
import torch

from svdllm_plugin.checkpoint import load_pretrained, read_safetensors, save_pretrained
from svdllm_plugin.checkpoint.bits import checkpoint_bits, tensor_bytes

SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # (out, in) per layer
WEIGHTS = 2 * sum(m * n for m, n in SHAPES)


def gptq(bits=4, group=64, targets="Linear"):
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = dict(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group)
    return GPTQModifier(
        config_groups={"g": dict(targets=[targets], weights=weights)}, ignore=["re:.*lm_head"]
    )


def rounded(model, dtype=torch.bfloat16):
    """The model with every float parameter rounded through ``dtype`` (what a bf16 file holds)."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for p in copy_.parameters():
            if p.is_floating_point():
                p.copy_(p.to(dtype).to(p.dtype))
    return copy_


@pytest.fixture(scope="module")
def probe():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def w4(tiny_dir, calib, probe):
    """GPTQ W4 group 64 on the tiny Llama: (model, its logits)."""
    from support import run_oneshot
    from transformers import AutoModelForCausalLM

    model = run_oneshot(AutoModelForCausalLM.from_pretrained(tiny_dir), calib, gptq())
    with torch.no_grad():
        return model, model(probe).logits


def test_dense_bits_and_bytes(tiny, tmp_path):
    assert WEIGHTS == 73_728
    fp32 = checkpoint_bits(save_pretrained(tiny, tmp_path / "fp32", save_dtype="fp32"))
    bf16 = checkpoint_bits(save_pretrained(tiny, tmp_path / "bf16", save_dtype="bf16"))
    assert fp32["decoder_linear_weights"] == bf16["decoder_linear_weights"] == WEIGHTS
    assert (fp32["decoder_linear_bits"], bf16["decoder_linear_bits"]) == (32.0, 16.0)
    assert bf16["decoder_linear_bytes"] == 2 * WEIGHTS
    embedding = tiny.model.embed_tokens.weight.numel()  # tied: stored once
    norms = 64 * (2 * 2 + 1)
    assert bf16["other_bytes"] == 2 * (embedding + norms)
    assert fp32["other_bytes"] == 2 * bf16["other_bytes"]
    assert (
        0 < bf16["safetensors_bytes"] - (bf16["other_bytes"] + bf16["decoder_linear_bytes"]) < 10_000
    )  # header
    assert "lm_head.weight" not in tensor_bytes(tmp_path / "bf16")  # casting kept the tie


def test_packed_bits_hand_computed(w4, tmp_path):
    model, _ = w4
    size = checkpoint_bits(save_pretrained(model, tmp_path / "w4", save_dtype="bf16"))
    # per Linear: out x in / 8 x 4 bits (int32 words), out x in/64 bf16 scales, an int64 (2,) weight_shape
    by_hand = sum(m * n // 2 + m * (n // 64) * 2 + 16 for m, n in SHAPES) * 2
    assert by_hand == 39_392
    assert size["decoder_linear_bytes"] == by_hand
    assert size["decoder_linear_bits"] == pytest.approx(8 * 39_392 / 73_728)  # 4.274
    record = json.loads((tmp_path / "w4" / "config.json").read_text())
    assert record["svdllm"]["size"] == size and record["svdllm"]["save_dtype"] == "bf16"
    assert record["dtype"] == "bfloat16"
    card = (tmp_path / "w4" / "README.md").read_text()
    assert "bits per decoder-Linear weight" in card and "4.274" in card


def test_factor_bits_hand_computed(tiny, calib, tmp_path):
    from support import RECIPE_SVD, run_oneshot

    from svdllm_plugin.layers import factorized_ranks

    run_oneshot(tiny, calib, RECIPE_SVD.format(ratio=0.5))
    size = checkpoint_bits(save_pretrained(tiny, tmp_path / "svd", save_dtype="bf16"))
    ranks = factorized_ranks(tiny)
    shapes = {name: tiny.get_submodule(name).svd_u.weight.shape[0] for name in ranks}  # out
    factors = sum(k * (shapes[n] + tiny.get_submodule(n).svd_v.weight.shape[1]) for n, k in ranks.items())
    dense = [n for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    dense = [n for n in dense if not n.endswith(("svd_u", "svd_v")) and n.rpartition(".")[0] not in ranks]
    kept = sum(tiny.get_submodule(n).weight.numel() for n in dense)
    assert size["decoder_linear_bits"] == pytest.approx(16 * (factors + kept) / WEIGHTS)
    assert size["decoder_linear_bits"] < 16


def test_bf16_reload_equals_the_model_rounded_to_bf16(tiny, w4, probe, tmp_path):
    dense = load_pretrained(save_pretrained(tiny, tmp_path / "dense", save_dtype="bf16"))
    with torch.no_grad():
        w4[0](probe)  # an earlier test's save left it compressed: decompress before saving again
    packed = load_pretrained(save_pretrained(w4[0], tmp_path / "packed", save_dtype="bf16"))
    # saving left the in-memory model compressed (integers + scales, compressed-tensors' design): its
    # copy with the float tensors rounded to bf16 is what the file holds
    on_disk = rounded(w4[0])
    with torch.no_grad():
        assert torch.equal(dense(probe).logits, rounded(tiny)(probe).logits)
        assert torch.equal(packed(probe).logits, on_disk(probe).logits)
        assert not torch.equal(packed(probe).logits, w4[1])  # the scales really are bf16 now
        assert torch.equal(w4[0](probe).logits, w4[1])  # the next forward decompresses: values as before
    state = read_safetensors(tmp_path / "packed")
    assert state["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.bfloat16
    assert state["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.int32


def test_save_dtype_none_keeps_fp32(w4, probe, tmp_path):
    reloaded = load_pretrained(save_pretrained(w4[0], tmp_path / "as-is"))
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, w4[1])


def test_bad_save_dtype_is_refused_before_writing(tiny, tmp_path):
    with pytest.raises(ValueError, match="--save-dtype must be one of bf16, fp16, fp32; got 'int8'"):
        save_pretrained(tiny, tmp_path / "x", save_dtype="int8")
    assert not (tmp_path / "x").exists()


def test_quip_transforms_reload_through_the_plugin(tiny_dir, calib, probe, tmp_path):
    """QuIP (random-Hadamard input rotation) + GPTQ W4: the online rotations are saved (one matrix per
    width, counted in the bits) and the plugin loader re-attaches them; stock loading refuses."""
    from llmcompressor.modifiers.transform import QuIPModifier
    from support import run_oneshot
    from transformers import AutoModelForCausalLM

    quip = QuIPModifier(rotations=["v"], transform_type="random-hadamard", ignore=["re:.*lm_head"])
    model = run_oneshot(AutoModelForCausalLM.from_pretrained(tiny_dir), calib, [quip, gptq()])
    with torch.no_grad():
        logits = model(probe).logits
    folder = save_pretrained(model, tmp_path / "quip", save_dtype="fp32")
    size = checkpoint_bits(folder)
    rotations = (64 * 64 + 128 * 128) * 4  # one fp32 matrix per input width (64, 128)
    w4_fp32 = sum(m * n // 2 + m * (n // 64) * 4 + 16 for m, n in SHAPES) * 2  # fp32 scales this time
    assert size["decoder_linear_bytes"] == w4_fp32 + rotations
    reloaded = load_pretrained(folder)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(probe).logits, logits, atol=1e-5, rtol=0
        )  # fp64 -> fp32 rotations
    with pytest.raises(ValueError, match="transform_config"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
