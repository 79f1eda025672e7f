"""`svdllm generate` on the two compressed folders of tests/cli/conftest.py."""

from __future__ import annotations

import pytest
import torch

from svdllm_plugin.cli import main

PROMPT = "What is the capital of France?"


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
