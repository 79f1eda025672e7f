"""Compressed folders load with stock transformers, in a process that cannot import svdllm_plugin.

Two folders of the hidden-256 tiny Llama (GQA: 4 heads / 2 KV heads): dense float factors (plain
truncated SVD, rank 64) and GPTQ W4 packed factors (recipes/svd_w4.yaml through oneshot). One
subprocess, with a fake ``svdllm_plugin`` package that raises ImportError first on its path, loads
both with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, computes logits,
generates through ``pipeline("text-generation")`` and tries the error cases; this process
compares with the plugin's own loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support import REPO
from support.factors import factorize, saved_and_reloaded
from support.processes import run_without_plugin

from svdllm_plugin.checkpoint import load_pretrained, read_safetensors, save_pretrained

PROMPT = "The capital of France is"
NEW_TOKENS = 6
ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MISSING = "model.layers.0.self_attn.q_proj.svd_u.weight"
STALE = "model.layers.0.self_attn.q_proj.weight"  # a dense weight left beside the factors
STRAY = "model.layers.1.mlp.extra_scale"

STOCK_SCRIPT = r"""
import json, sys
import torch
try:
    import svdllm_plugin  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

work = sys.argv[1]
out = {"blocked": blocked}
probe = torch.load(f"{work}/probe.pt")
for name in ("dense", "w4"):
    folder = f"{work}/{name}"
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        torch.save(model(probe).logits, f"{work}/{name}-stock.pt")
    q_proj = model.model.layers[0].self_attn.q_proj
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generate(sys.argv[2], max_new_tokens=int(sys.argv[3]), do_sample=False, return_full_text=False)
    module = type(model).__module__.rpartition(".")[2]
    out[name] = {"class": f"{module}.{type(model).__name__}", "text": text[0]["generated_text"],
                 "q_proj": sorted(n for n, _ in q_proj.named_children())}
runtime = {"fuse": True, "latent_kv_cache": True}  # the load-time inference options
model = AutoModelForCausalLM.from_pretrained(f"{work}/dense", trust_remote_code=True, svdllm_runtime=runtime)
tokenizer = AutoTokenizer.from_pretrained(f"{work}/dense", trust_remote_code=True)
ids = tokenizer(sys.argv[2], return_tensors="pt")
generated = model.generate(**ids, max_new_tokens=int(sys.argv[3]), do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)
new_ids = generated[0, ids["input_ids"].shape[1]:]
out["runtime"] = {"text": tokenizer.decode(new_ids, skip_special_tokens=True),
                  "cache": type(model._svdllm_latent_cache()).__name__,
                  "fused": int(getattr(model, "_svdllm_fused_groups", 0))}
model = AutoModelForCausalLM.from_pretrained(f"{work}/w4", trust_remote_code=True, dtype=torch.float32,
                                             svdllm_runtime={"fuse": True})
with torch.no_grad():
    torch.save(model(probe).logits, f"{work}/w4-fused-stock.pt")
out["w4_fused"] = int(getattr(model, "_svdllm_fused_groups", 0))
for case, kwargs in (("no_trust", {}), ("missing", {"trust_remote_code": True}),
                     ("stale", {"trust_remote_code": True}), ("stray", {"trust_remote_code": True})):
    folder = f"{work}/{'dense' if case == 'no_trust' else case}"
    try:
        AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        out[case] = None
    except Exception as error:
        out[case] = f"{type(error).__name__}: {error}"
print("\nRESULT " + json.dumps(out))  # the refused prompt leaves no newline
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_factory, tokenizer, calib) -> Path:
    """dense/ and w4/ compressed folders, missing/ (dense without one tensor), probe.pt."""
    from support import run_oneshot

    work = tmp_path_factory.mktemp("stock")
    source = work / "source"
    saved_and_reloaded(tiny_factory(hidden=256), source, tokenizer)
    dense = factorize(load_pretrained(source), 64, ALL_PROJ)
    save_pretrained(dense, work / "dense", tokenizer)
    w4 = run_oneshot(load_pretrained(source), calib, str(REPO / "recipes" / "svd_w4.yaml"))
    save_pretrained(w4, work / "w4", tokenizer)

    shutil.copytree(work / "dense", work / "missing")
    from safetensors.torch import save_file

    state = read_safetensors(work / "missing")
    del state[MISSING]
    save_file(state, work / "missing" / "model.safetensors", metadata={"format": "pt"})
    for case, extra in ((STALE, (256, 256)), (STRAY, (3,))):  # a tensor no module of the structure has
        folder = work / ("stale" if case == STALE else "stray")
        shutil.copytree(work / "dense", folder)
        state = read_safetensors(folder)
        state[case] = torch.ones(extra)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    torch.save(
        torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(5)),
        work / "probe.pt",
    )
    return work


@pytest.fixture(scope="module")
def stock(work) -> dict:
    """What the blocked subprocess saw (its logits are in ``<name>-stock.pt``)."""
    return run_without_plugin(STOCK_SCRIPT, work, work, PROMPT, NEW_TOKENS)


def test_subprocess_cannot_import_the_plugin(stock):
    assert stock["blocked"]


@pytest.mark.parametrize("name", ["dense", "w4"])
def test_stock_logits_equal_the_plugin_loader(work, stock, name):
    plugin = load_pretrained(work / name)
    with torch.no_grad():
        expected = plugin(torch.load(work / "probe.pt")).logits
    assert stock[name]["class"] == "modeling_svdllm.LlamaForCausalLM"  # the folder's subclass
    assert stock[name]["q_proj"] == ["svd_u", "svd_v"]
    assert torch.equal(torch.load(work / f"{name}-stock.pt"), expected)


@pytest.mark.parametrize("name", ["dense", "w4"])
def test_pipeline_generates_what_the_plugin_model_generates(work, stock, tokenizer, name):
    plugin = load_pretrained(work / name)
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = plugin.generate(
            **ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert stock[name]["text"] == expected


def test_runtime_options_from_the_stock_path(stock):
    """``svdllm_runtime={"fuse": True, "latent_kv_cache": True}`` works without the plugin: the
    folder's copies of the fused-factor and latent-cache code run, and greedy text is unchanged."""
    assert stock["runtime"]["cache"] == "LatentKVCache" and stock["runtime"]["fused"] > 0
    assert stock["runtime"]["text"] == stock["dense"]["text"]


def test_folder_without_the_modeling_code_trust_is_refused(stock):
    assert "trust_remote_code" in stock["no_trust"]  # not loaded into a dense Llama with random weights


def test_missing_tensor_is_an_error_naming_it(work, stock):
    assert stock["missing"].startswith("ValueError") and MISSING in stock["missing"]
    with pytest.raises(ValueError, match="missing"):
        load_pretrained(work / "missing")


@pytest.mark.parametrize("case", ["stale", "stray"])
def test_unexpected_tensor_is_an_error_naming_it(work, stock, case):
    """A tensor the structure has no place for is refused by both loaders, not dropped silently."""
    name = STALE if case == "stale" else STRAY
    assert stock[case] is not None and stock[case].startswith("ValueError") and name in stock[case]
    with pytest.raises(ValueError, match="unexpected"):
        load_pretrained(work / case)


def test_fused_packed_folder_loads_through_the_stock_path(work, stock):
    """``svdllm_runtime={"fuse": True}`` on a W4 packed folder: loads, and computes what the unfused
    stock model computes."""
    fused = torch.load(work / "w4-fused-stock.pt")
    unfused = torch.load(work / "w4-stock.pt")
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)


def test_folder_layout(work):
    config = json.loads((work / "w4" / "config.json").read_text())
    assert config["model_type"] == "svdllm" and config["architectures"] == ["SVDLLMForCausalLM"]
    # what vLLM's Transformers backend reads: the base architecture's own classes, factorized
    assert config["auto_map"]["AutoModel"] == "modeling_svdllm.LlamaModel"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_svdllm.LlamaForCausalLM"
    assert config["svdllm"]["base_model_type"] == "llama" and config["svdllm"]["format"] == "packed"
    files = {p.name for p in (work / "w4").iterdir()}
    assert {"modeling_svdllm.py", "svdllm_runtime.py", "svdllm_fused.py", "svdllm_latent_cache.py"} <= files
    assert {"README.md", "recipe.yaml", "tokenizer.json"} <= files
    modeling = (work / "w4" / "modeling_svdllm.py").read_text()
    assert "import svdllm_plugin" not in modeling and "from svdllm_plugin" not in modeling
