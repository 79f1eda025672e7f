"""`svdllm export-gptq` on the W4 factor folder (tests/cli/conftest.py): the auto-gptq layout holds
the same integers and scales as the compressed-tensors folder."""

from __future__ import annotations

import json

import torch

from svdllm_plugin.cli import main


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
