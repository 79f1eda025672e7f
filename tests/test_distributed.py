"""Distributed oneshot under ``torchrun --nproc-per-node 2`` (gloo CPU ranks): each rank calibrates
its share of the samples (4 / 4, and an uneven 3 / 4) and must save the factors one process gets on
all of them; SVD + GPTQ W4 through ``torchrun -m svdllm_plugin.cli compress``; and a failing or
disagreeing rank is an error on every rank, never a hang.

SVD + W4: the packed save calls compressed-tensors' ``compress_model``, which under torchrun is a
collective (modules split over the ranks, results exchanged). Rank 0 used to save alone while
rank 1 waited in a barrier: both hung after "oneshot done". The timeout turns a hang into a
failure.
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
from support import REPO, run_oneshot

from svdllm_plugin import SVDLLMModifier
from svdllm_plugin.checkpoint import load_pretrained
from svdllm_plugin.layers import SVDLinear, factorized_ranks

WORKERS = REPO / "tests" / "support"
CASES = {  # one statistic or reduction each: X X^T, |x| max, Fisher sums, two passes, spectra, losses
    "svd_llm": {"ratio": 0.3},
    "asvd_max": {"ratio": 0.3, "method": "asvd", "asvd_statistic": "abs_max"},
    "fwsvd": {"ratio": 0.3, "method": "fwsvd"},
    "update": {"ratio": 0.3, "closed_form_update": True},
    "intra": {"ratio": 0.3, "update": "input", "intra_layer": True},  # reruns each layer per input group
    "loss": {"ratio": 0.3, "allocation": "loss"},
    "sensitivity": {
        "ratio": 0.3,
        "allocation": "sensitivity",
        "sensitivity_batches": 8,
        "sensitivity_ratios": [0.3, 0.6],
    },
}
# the reductions whose weights depend on each rank's share: sums, token counts, means
UNEVEN = {case: CASES[case] for case in ("svd_llm", "fwsvd", "sensitivity")}
RECIPE_W4 = """
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


def torchrun(*args, cwd: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` in its own process group, so that on a
    hang the ranks (torchrun's children) are killed with it and the test fails."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(a) for a in args]
    proc = subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun {' '.join(command[6:])}: the ranks hung\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_cases(tiny_dir: Path, out: Path, cases: dict, samples: int) -> Path:
    """Every case of ``cases`` through tests/support/distributed_worker.py; the folder it wrote."""
    worker = WORKERS / "distributed_worker.py"
    done = torchrun(
        worker, tiny_dir, out, json.dumps(cases), cwd=out, timeout=300, SVDLLM_TEST_SAMPLES=str(samples)
    )
    assert done.returncode == 0, f"torchrun failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return out


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory) -> Path:
    return run_cases(tiny_dir, tmp_path_factory.mktemp("distributed"), CASES, samples=8)


@pytest.fixture(scope="module")
def uneven(tiny_dir, tmp_path_factory) -> Path:
    return run_cases(tiny_dir, tmp_path_factory.mktemp("uneven"), UNEVEN, samples=7)


def _products(model) -> dict[str, torch.Tensor]:
    return {n: m.dense().detach() for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def _records(records: list[dict]) -> list[tuple]:
    return [(r["name"], r["rank"], r["tokens"]) for r in records]


def check_single_process_factors(out: Path, case: str, model, calib, shares: list[int]) -> list[dict]:
    """What torchrun saved for ``case`` equals one process's oneshot on all of ``calib``: the same
    factor products (statistics summed over the ranks), ranks and token counts on every rank."""
    modifier = SVDLLMModifier(**CASES[case])
    single = _products(run_oneshot(model, calib, modifier))
    ranks = [torch.load(out / f"{case}-rank{r}.pt") for r in (0, 1)]
    saved = _products(load_pretrained(out / case))
    assert [r["samples"] for r in ranks] == shares  # each rank calibrated its share
    assert set(saved) == set(single)
    for name, W in single.items():
        torch.testing.assert_close(saved[name], W, rtol=1e-5, atol=1e-5 * W.abs().max().item())
    for rank in ranks:
        assert _records(rank["records"]) == _records(modifier.records)
    return ranks


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_save_the_single_process_factors(two_ranks, tiny, calib, case):
    ranks = check_single_process_factors(two_ranks, case, tiny, calib, shares=[4, 4])
    saved = _products(load_pretrained(two_ranks / case))
    for name, W in saved.items():  # every rank holds the same model, and it is what rank 0 saved
        torch.testing.assert_close(ranks[1]["products"][name], ranks[0]["products"][name], rtol=0, atol=0)
        torch.testing.assert_close(W, ranks[0]["products"][name], rtol=0, atol=0)
    for rank in ranks:  # every sample counted once, on both ranks
        assert {r["tokens"] for r in rank["records"]} == {len(calib) * len(calib[0]["input_ids"])}


@pytest.mark.parametrize("case", list(UNEVEN))
def test_uneven_split_saves_the_single_process_factors(uneven, tiny, calib, case):
    check_single_process_factors(uneven, case, tiny, calib.select(range(7)), shares=[3, 4])


def test_only_rank_zero_writes(two_ranks):
    written = {p.name for p in two_ranks.iterdir()}
    expected = set(CASES) | {f"{case}-rank{r}.pt" for case in CASES for r in (0, 1)}
    assert written == expected  # no second checkpoint, no leftover temp folders


def test_torchrun_svd_w4_saves_a_packed_folder(tiny_dir, tmp_path):
    """The folder rank 0 wrote is packed and computes what the same folder's dense factors do."""
    (tmp_path / "svd_w4.yaml").write_text(RECIPE_W4)
    argv = ["-m", "svdllm_plugin.cli", "compress", "--model", tiny_dir, "--recipe", "svd_w4.yaml"]
    argv += ["--output", "out", "--num-samples", "8", "--seq-len", "32", "--eval-windows", "0", "--debug"]
    done = torchrun(*argv, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    folder = tmp_path / "out"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    model = load_pretrained(folder)
    ranks = factorized_ranks(model)
    assert ranks == config["svdllm"]["ranks"] and all(k % 16 == 0 for k in ranks.values())
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


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
    done = torchrun(WORKERS / "distributed_jobs_worker.py", case, cwd=tmp_path, timeout=120)
    # the two ranks share one stdout pipe: a line of one may land in the middle of the other's
    results = [r.strip() for r in re.findall(r"RESULT (.*?)(?=RESULT |\n|$)", done.stdout)]
    assert len(results) == 2, done.stderr[-3000:]
    for result in results:
        assert re.search(message, result), result
