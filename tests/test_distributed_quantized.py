"""SVD + GPTQ W4 under ``torchrun -m svdllm_plugin.cli compress`` with 2 gloo ranks.

The packed save calls compressed-tensors' ``compress_model``, which under torchrun is a
collective (modules split over the ranks, results exchanged). Rank 0 used to save alone while
rank 1 waited in a barrier: both hung after "oneshot done". The timeout turns a hang into a
failure; the folder rank 0 wrote must load and compute what the plugin's loader computes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svdllm_plugin.checkpoint import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """
svd_stage:
  svd_modifiers:
    SVDLLMModifier:
      ratio: 0.3
      rank_multiple: 16
      ignore: ["re:.*lm_head"]
    GPTQModifier:
      ignore: ["re:.*lm_head"]
      config_groups:
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 16}
"""


@pytest.fixture(scope="module")
def torchrun_w4(tiny_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("torchrun_w4")
    (work / "svd_w4.yaml").write_text(RECIPE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "svdllm_plugin.cli", "compress", "--model", str(tiny_dir), "--recipe", "svd_w4.yaml"]
    command += ["--output", "out", "--num-samples", "8", "--seq-len", "32", "--eval-windows", "0", "--debug"]
    # its own process group: on a hang the ranks (torchrun's children) are killed with it
    proc = subprocess.Popen(
        command,
        env=env,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun SVD + W4 hung (deadlock at save?):\n{stderr[-3000:]}")
    return work / "out", subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def test_torchrun_svd_w4_saves_a_packed_folder(torchrun_w4):
    folder, done = torchrun_w4
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    config = (folder / "config.json").read_text()
    assert '"pack-quantized"' in config
    model = load_pretrained(folder)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
