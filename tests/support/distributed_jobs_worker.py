"""One rank of tests/test_distributed.py's job-agreement tests (``torchrun --nproc-per-node 2``).

Usage: ``distributed_jobs_worker.py CASE``: ``fail`` (rank 1's decompositions raise) or ``disagree``
(rank 1 has one more module ready). Prints ``RESULT <what decompose_on_owners raised, or ok>``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from svdllm_plugin import distributed
from svdllm_plugin.modifiers.svd.decompose import Factors
from svdllm_plugin.modifiers.svd.statistics import InputStatistics


def main(case: str) -> None:
    assert distributed.init_process_group()
    rank = dist.get_rank()

    def statistics() -> InputStatistics:
        stats = InputStatistics.empty(4, "cpu")
        stats.add(torch.randn(8, 4))
        return stats

    names = ["a", "b", "c", "d"] + (["expert"] if case == "disagree" and rank == 1 else [])
    jobs = {name: ((4, 4), [statistics()]) for name in names}

    def decompose(name: str):
        if case == "fail" and rank == 1:
            raise ValueError("Cholesky failed")
        return Factors(torch.ones(4, 2), torch.ones(2, 4), torch.ones(4), 0.0), 0.0

    try:
        distributed.decompose_on_owners(jobs, frozenset({"H"}), decompose)
        print("RESULT ok", flush=True)
    except RuntimeError as error:
        print(f"RESULT {error}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
