"""`svdllm generate` and `svdllm export-gptq` on tiny compressed folders.

Two folders for the module, written by `svdllm compress` with the recipes themselves: a float
SVD-LLM checkpoint (recipes/svd_llm_0.2.yaml) and a GPTQ W4 factor checkpoint
(recipes/svd_w4.yaml), both on the hidden-256 tiny Llama with the SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import REPO

from svdllm_plugin.cli import main

PROMPT = "What is the capital of France?"
RECIPES = REPO / "recipes"


def _compressed(recipe_stem, tmp_path_factory, save_tiny) -> Path:
    work = tmp_path_factory.mktemp(recipe_stem)
    dense = save_tiny(work / "dense", hidden=256, max_position_embeddings=128)
    out = work / "checkpoint"
    recipe = RECIPES / f"{recipe_stem}.yaml"
    argv = ["compress", "--model", str(dense), "--recipe", str(recipe), "--output", str(out)]
    assert main([*argv, "--num-samples", "8", "--seq-len", "32", "--eval-windows", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def svd_folder(tmp_path_factory, save_tiny):
    return _compressed("svd_llm_0.2", tmp_path_factory, save_tiny)


@pytest.fixture(scope="module")
def w4_folder(tmp_path_factory, save_tiny):
    return _compressed("svd_w4", tmp_path_factory, save_tiny)


def _reference_generation(folder, max_new_tokens: int) -> str:
    """What greedy chat generation gives, computed here without the CLI."""
    from transformers import AutoTokenizer

    from svdllm_plugin.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(
            **chat, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("folder", ["svd_folder", "w4_folder"])
def test_generate_is_greedy_chat(request, capsys, folder):
    folder = request.getfixturevalue(folder)
    capsys.readouterr()  # the fixture's compress report
    assert main(["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert printed == _reference_generation(folder, 5) + "\n"


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_generate_with_bitsandbytes(svd_folder, capsys, monkeypatch, mode):
    pytest.importorskip("bitsandbytes")
    from svdllm_plugin.export import bitsandbytes as quantized

    converted = []
    original = quantized.to_bitsandbytes

    def spy(model, mode="nf4", **kwargs):
        converted.append(mode)
        return original(model, mode, **kwargs)

    monkeypatch.setattr(quantized, "to_bitsandbytes", spy)
    argv = ["generate", str(svd_folder), "--prompt", PROMPT, "--max-new-tokens", "3", "--bnb", mode]
    assert main(argv) == 0
    assert converted == [mode]
    assert capsys.readouterr().out.endswith("\n")


def test_generate_refuses_bnb_on_a_gptq_folder(w4_folder, capsys):
    assert main(["generate", str(w4_folder), "--prompt", PROMPT, "--bnb", "nf4"]) == 2
    assert "already quantized by compressed-tensors" in capsys.readouterr().err


def test_generate_rejects_bad_arguments(svd_folder, capsys):
    with pytest.raises(SystemExit):  # argparse: --bnb takes nf4 or int8 (more cases: test_cli_errors.py)
        main(["generate", str(svd_folder), "--prompt", PROMPT, "--bnb", "fp4"])
    assert "argument --bnb: invalid choice: 'fp4'" in capsys.readouterr().err


def test_export_gptq(w4_folder, tmp_path, capsys):
    from svdllm_plugin.checkpoint import read_safetensors
    from svdllm_plugin.export import read_quantized_weights, unpack_gptq_integers, unpack_gptq_linear

    out = tmp_path / "gptq"
    assert main(["export-gptq", str(w4_folder), "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "quantize_config.json", "tokenizer.json"} <= files
    quantize_config = json.loads((out / "quantize_config.json").read_text())
    assert (quantize_config["bits"], quantize_config["group_size"], quantize_config["sym"]) == (4, 64, True)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["svdllm"]["ranks"] == json.loads((w4_folder / "config.json").read_text())["svdllm"]["ranks"]

    state, saved = read_safetensors(out), read_quantized_weights(w4_folder)
    assert len(saved) == 28  # 2 layers x 7 SVDLinear x (svd_u, svd_v)
    for name, qw in saved.items():
        t = {k: state[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        q_u, zeros = unpack_gptq_integers(t["qweight"], t["qzeros"], 4)
        assert torch.equal(q_u, qw.q.to(torch.int64) + 8) and bool((zeros == 8).all())
        W = unpack_gptq_linear(**t, bits=4)
        assert torch.equal(W, qw.dequantize(scale=qw.scale.half().float()))

    assert main(["export-gptq", str(w4_folder), "--output", str(out)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["export-gptq", str(w4_folder), "--output", str(out), "--overwrite"]) == 0


def test_export_gptq_refuses_an_unquantized_folder(svd_folder, tmp_path, capsys):
    out = tmp_path / "gptq"
    assert main(["export-gptq", str(svd_folder), "--output", str(out)]) == 2
    assert "no quantized Linears" in capsys.readouterr().err
    assert not out.exists()
