"""End to end on the real SmolLM2-135M through the installed `svdllm` command."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smollm2

RECIPE = """\
svd_stage:
  svd_modifiers:
    SVDLLMModifier:
      ratio: 0.2
      targets: ["re:.*layers\\\\.(0|1)\\\\..*_proj$"]
"""


def svdllm(*args) -> subprocess.CompletedProcess:
    exe = shutil.which("svdllm", path=str(Path(sys.executable).parent)) or "svdllm"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=900)


def test_cli_compress_and_eval_smollm2(smollm2_path, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "smollm2-svd"
    run = svdllm(
        "compress",
        "--recipe",
        str(recipe),
        "--num-samples",
        "4",
        "--seq-len",
        "64",
        "--eval-windows",
        "2",
        "--output",
        str(out),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "params (whole model)" in run.stdout and "134,515,008" in run.stdout
    ranks = json.loads((out / "config.json").read_text())["svdllm"]["ranks"]
    assert len(ranks) == 14 and ranks["model.layers.0.self_attn.q_proj"] == 230
    run = svdllm("eval", str(out), "--seq-len", "64", "--max-windows", "2", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    ppl = json.loads(run.stdout.strip().splitlines()[-1])["perplexity"]
    assert 1 < ppl < 1000
