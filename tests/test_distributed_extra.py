"""Under torchrun with 2 gloo ranks: SVD + GPTQ W4 through ``torchrun -m svdllm_plugin.cli
compress``, and an uneven split of the calibration samples (3 / 4).

SVD + W4:
The packed save calls compressed-tensors' ``compress_model``, which under torchrun is a
collective (modules split over the ranks, results exchanged). Rank 0 used to save alone while
rank 1 waited in a barrier: both hung after "oneshot done". The timeout turns a hang into a
failure; the folder rank 0 wrote must load and compute what the plugin's loader computes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import REPO

from svdllm_plugin import SVDLLMModifier
from svdllm_plugin.checkpoint import load_pretrained
from svdllm_plugin.layers import SVDLinear

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
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
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


UNEVEN = {  # the reductions whose weights depend on each rank's share: sums, token counts, means
    "svd_llm": {"ratio": 0.3},
    "fwsvd": {"ratio": 0.3, "method": "fwsvd"},
    "sensitivity": {
        "ratio": 0.3,
        "allocation": "sensitivity",
        "sensitivity_batches": 8,
        "sensitivity_ratios": [0.3, 0.6],
    },
}


@pytest.fixture(scope="module")
def uneven(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uneven")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "SVDLLM_TEST_SAMPLES": "7",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [
        str(REPO / "tests" / "support" / "distributed_worker.py"),
        str(tiny_dir),
        str(out),
        json.dumps(UNEVEN),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return out


@pytest.mark.parametrize("case", list(UNEVEN))
def test_uneven_split_saves_the_single_process_factors(uneven, tiny, calib, case):
    from support import run_oneshot

    seven = calib.select(range(7))
    modifier = SVDLLMModifier(**UNEVEN[case])
    run_oneshot(tiny, seven, modifier)
    ranks = [torch.load(uneven / f"{case}-rank{r}.pt") for r in (0, 1)]
    assert [r["samples"] for r in ranks] == [3, 4]
    saved = load_pretrained(uneven / case)
    single = {n: m.dense().detach() for n, m in tiny.named_modules() if isinstance(m, SVDLinear)}
    got = {n: m.dense().detach() for n, m in saved.named_modules() if isinstance(m, SVDLinear)}
    assert set(got) == set(single)
    for name, W in single.items():
        torch.testing.assert_close(got[name], W, rtol=1e-5, atol=1e-5 * W.abs().max().item())
    for rank in ranks:
        assert [(r["name"], r["rank"], r["tokens"]) for r in rank["records"]] == [
            (r["name"], r["rank"], r["tokens"]) for r in modifier.records
        ]


@pytest.mark.parametrize(
    "case, message",
    [
        ("fail", "decomposition failed on torchrun rank 1: .*ValueError: Cholesky failed"),
        ("disagree", "different modules ready to decompose .*expert"),
    ],
)
def test_a_failing_or_disagreeing_rank_is_an_error_on_every_rank(tmp_path, case, message):
    """An exception on an owner rank, or a module ready on one rank only, used to leave the other
    ranks waiting in a collective forever; now every rank raises the same one-line error."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(REPO / "tests" / "support" / "distributed_jobs_worker.py"), case]
    proc = subprocess.Popen(
        command,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {case}: the ranks hung")
    # the two ranks share one stdout pipe: a line of one may land in the middle of the other's
    results = [r.strip() for r in re.findall(r"RESULT (.*?)(?=RESULT |\n|$)", stdout)]
    assert len(results) == 2, stderr[-3000:]
    for result in results:
        assert re.search(message, result), result
