"""The checkpoint package: one on-disk format, the model card, the runtime-options hook, no cycles.

Dense-factor folders of conftest's tiny Llama (plain truncated SVD, no calibration); the packed
direction is covered by test_quantized and test_stock_loading.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from support import REPO
from support.factors import factorize
from support.processes import run_python

from svdllm_plugin.checkpoint import load_pretrained, save_pretrained
from svdllm_plugin.layers import SVDLinear

PACKAGE = REPO / "svdllm_plugin"
TARGETS = ("q_proj", "o_proj", "up_proj")
RECIPE = "svd_stage:\n  svd_modifiers:\n    SVDLLMModifier:\n      ratio: 0.2\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_factory, tokenizer) -> Path:
    model = factorize(tiny_factory(), 16, TARGETS)
    return save_pretrained(
        model,
        tmp_path_factory.mktemp("fmt") / "ckpt",
        tokenizer,
        recipe=RECIPE,
        extra={"ppl_before": 12.5, "ppl_after": 14.25, "ppl_other_before": 18.0, "ppl_other_after": 40.5},
        base_model="org/tiny-base",
    )


@pytest.fixture(scope="module")
def probe(tokenizer) -> torch.Tensor:
    return torch.randint(0, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(7))


def test_record(folder):
    config = json.loads((folder / "config.json").read_text())
    record = config["svdllm"]
    assert record["format"] == "dense" and "quantization_config" not in config
    assert record["base_model_type"] == "llama" and record["base_architectures"] == ["LlamaForCausalLM"]
    assert record["ranks"]["model.layers.1.mlp.up_proj"] == 16 and len(record["ranks"]) == 6
    assert (record["ppl_before"], record["ppl_after"]) == (12.5, 14.25)
    assert (folder / "recipe.yaml").read_text() == RECIPE


def test_model_card(folder):
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: org/tiny-base" in card
    assert "| held-out perplexity (measured by the run) | 12.500 | 14.250 |" in card
    assert "| other-domain perplexity (license prose) | 18.000 | 40.500 |" in card
    assert "| up_proj | 2 | 16 | 16 | 16 |" in card
    assert "| parameters |" in card and "| weight bytes |" in card
    assert "trust_remote_code=True" in card and "load_pretrained" in card and "recipe.yaml" in card
    assert 'from_pretrained("ckpt", trust_remote_code=True)' in card  # the folder's name, not the temp one


def test_earlier_layout_still_loads(folder, tmp_path, probe):
    """Folders written before this format: model_type of the base, no format, no modeling file."""
    import shutil

    old = shutil.copytree(folder, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    for key in ("auto_map", "format", "base_model_type", "base_architectures"):
        config.pop(key, None)
        config["svdllm"].pop(key, None)
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (old / "config.json").write_text(json.dumps(config))
    (old / "modeling_svdllm.py").unlink()
    with torch.no_grad():
        assert torch.equal(load_pretrained(old)(probe).logits, load_pretrained(folder)(probe).logits)


def test_reloaded_model_saves_the_same_record(folder, tmp_path):
    again = save_pretrained(load_pretrained(folder), tmp_path / "again")
    record, first = (json.loads((f / "config.json").read_text())["svdllm"] for f in (again, folder))
    assert {k: record[k] for k in ("format", "base_model_type", "base_architectures", "ranks")} == {
        k: first[k] for k in ("format", "base_model_type", "base_architectures", "ranks")
    }
    assert isinstance(load_pretrained(again).model.layers[0].self_attn.q_proj, SVDLinear)


def test_runtime_options_hook(monkeypatch):
    """``_apply_runtime_options`` merges config.json's options with the kwarg ones and dispatches."""
    from svdllm_plugin.checkpoint import modeling_svdllm, svdllm_runtime

    class Config:
        svdllm_runtime = {"fuse": True}

    class Unknown:
        svdllm_runtime = {"fuse_all": True}

    with pytest.raises(ValueError, match=r"unknown svdllm_runtime options \['fuse_all'\]"):
        modeling_svdllm._apply_runtime_options(object(), Unknown())
    seen = []
    monkeypatch.setitem(svdllm_runtime.OPTIONS, "fuse", lambda model, value: seen.append(value) or model)
    model = object()
    assert modeling_svdllm._apply_runtime_options(model, Config(), {"fuse": "qkv"}) is model
    assert seen == ["qkv"]


def test_no_import_cycle_and_standalone_modeling_files():
    """checkpoint never imports export (export reads checkpoint); the folder's files import only
    torch and transformers; nothing in the package imports llmcompressor at module level."""

    def imports(path: Path, top_level_only: bool) -> set[str]:
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        names = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or ""))
        return names

    for path in (PACKAGE / "checkpoint").glob("*.py"):
        found = imports(path, top_level_only=False)
        assert not any(n.startswith("svdllm_plugin.export") for n in found), path.name
        assert not any(n.startswith("llmcompressor") for n in imports(path, top_level_only=True)), path.name
        if path.name == "modeling_svdllm.py":
            assert {n.split(".")[0] for n in found} <= {"__future__", "torch", "transformers", ""}, path.name
        if path.name == "svdllm_runtime.py":  # the folder's copies first, the plugin's in-package fallback
            assert {n.split(".")[0] for n in found} <= {"__future__", "", "svdllm_plugin"}, path.name
    for path in (PACKAGE / "inference").glob("*.py"):  # copied into every folder beside the modeling code
        optional = {"triton"} if path.name == "triton_lowrank.py" else set()  # GPU only, import guarded
        assert {n.split(".")[0] for n in imports(path, top_level_only=False)} <= {
            "__future__",
            "torch",
            "transformers",
            "",
            "functools",
            "math",
            "sys",  # the standard library is in every Python
        } | optional, path.name


def test_stock_loading_in_a_plugin_process(folder, probe, tmp_path):
    """With the plugin imported (its AutoConfig carrier registered by load_pretrained), the stock
    path still loads the same model (AutoModel too: the base model, factorized), the tokenizer asks
    nothing, and the runtime kwarg reaches the hook."""
    script = f"""
import builtins, torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from svdllm_plugin.checkpoint import load_pretrained

def no_prompt(*args):
    raise AssertionError("transformers asked whether to run remote code")

builtins.input = no_prompt
folder, probe = {str(folder)!r}, torch.tensor({probe.tolist()})
plugin = load_pretrained(folder)
AutoTokenizer.from_pretrained(folder)
stock = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    assert torch.equal(stock(probe).logits, plugin(probe).logits)
base = AutoModel.from_pretrained(folder, trust_remote_code=True)  # what vLLM's Transformers backend builds
assert type(base).__name__ == "LlamaModel" and type(base).__module__.endswith("modeling_svdllm")
assert hasattr(base.layers[0].self_attn.q_proj, "svd_u")
with torch.no_grad():
    assert torch.equal(base(probe).last_hidden_state, plugin.model(probe).last_hidden_state)
# transformers now maps LlamaConfig to our entry class in this process: plain models stay plain
plain = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=1, num_attention_heads=2))
assert type(plain).__name__ == "LlamaForCausalLM", type(plain)
try:
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, svdllm_runtime={{"bogus": 1}})
except ValueError as error:
    assert "unknown svdllm_runtime options ['bogus']" in str(error), error
else:
    raise AssertionError("an unknown runtime option was accepted")
print("OK")
"""
    run = run_python(["-c", script], cwd=tmp_path, pythonpath=PACKAGE.parent)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]
