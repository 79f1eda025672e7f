"""Distributed oneshot: 2 CPU ranks (gloo, started by torchrun) each calibrate half of the
samples and must save the same factors as one process on all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import REPO, run_oneshot

from svdllm_plugin import SVDLLMModifier
from svdllm_plugin.checkpoint import load_pretrained
from svdllm_plugin.layers import SVDLinear

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


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory) -> Path:
    """Run every case under ``torchrun --nproc-per-node 2``; the folder of what they wrote."""
    out = tmp_path_factory.mktemp("distributed")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [
        str(REPO / "tests" / "support" / "distributed_worker.py"),
        str(tiny_dir),
        str(out),
        json.dumps(CASES),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"torchrun failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return out


def _products(model) -> dict[str, torch.Tensor]:
    return {n: m.dense().detach() for n, m in model.named_modules() if isinstance(m, SVDLinear)}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_save_the_single_process_factors(two_ranks, tiny, calib, case):
    modifier = SVDLLMModifier(**CASES[case])
    single = _products(run_oneshot(tiny, calib, modifier))
    ranks = [torch.load(two_ranks / f"{case}-rank{r}.pt") for r in (0, 1)]
    saved = _products(load_pretrained(two_ranks / case))

    assert [r["samples"] for r in ranks] == [4, 4]  # each rank calibrated its half
    assert set(saved) == set(single)
    for name, W in single.items():
        # every rank holds the same model, and it is what rank 0 saved
        torch.testing.assert_close(ranks[1]["products"][name], ranks[0]["products"][name], rtol=0, atol=0)
        torch.testing.assert_close(saved[name], ranks[0]["products"][name], rtol=0, atol=0)
        # statistics summed over the ranks give the single-process factors
        torch.testing.assert_close(saved[name], W, rtol=1e-5, atol=1e-5 * W.abs().max().item())
    for rank in ranks:  # ranks and token counts: every sample counted once, on both ranks
        got = [(r["name"], r["rank"], r["tokens"]) for r in rank["records"]]
        assert got == [(r["name"], r["rank"], r["tokens"]) for r in modifier.records]
        assert {r["tokens"] for r in rank["records"]} == {len(calib) * len(calib[0]["input_ids"])}


def test_only_rank_zero_writes(two_ranks):
    written = {p.name for p in two_ranks.iterdir()}
    expected = set(CASES) | {f"{case}-rank{r}.pt" for case in CASES for r in (0, 1)}
    assert written == expected  # no second checkpoint, no leftover temp folders
