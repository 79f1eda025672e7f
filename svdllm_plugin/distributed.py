"""Distributed oneshot under ``torchrun``: every rank calibrates its share of the samples,
statistics are summed across ranks, each matrix is decomposed once on an owner rank and its
factors are broadcast, so every rank ends with the same model; only rank 0 writes it.

The pattern is llm-compressor's GPTQ (``modifiers/gptq/base.py``): owners by
``greedy_bin_packing`` on an estimated cost, ``dist.reduce`` (SUM) of each statistic to its
owner, work on the owner, ``dist.broadcast`` of the result. Every function here is the
identity / a plain loop when no process group is initialized.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
from compressed_tensors.distributed import greedy_bin_packing, is_distributed, is_source_process
from loguru import logger

__all__ = [
    "is_distributed",
    "is_source_process",
    "init_process_group",
    "rank_partition",
    "decompose_on_owners",
    "sum_over_ranks",
    "mean_over_ranks",
    "save_on_source",
]


def init_process_group() -> bool:
    """Join the process group when started by ``torchrun``; True when distributed.

    On accelerators this is compressed-tensors' ``init_dist`` (nccl on CUDA, one device per
    local rank); its device query fails on a CPU-only machine, so there we start gloo.
    """
    if is_distributed():
        return True
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    if torch.accelerator.is_available():
        from compressed_tensors.distributed import init_dist

        init_dist()
    else:
        dist.init_process_group("gloo", init_method="env://")
    logger.info("rank {} of {} ({} backend)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def rank_partition(dataset):
    """This rank's contiguous share of ``dataset`` (same bounds as llm-compressor's
    ``get_rank_partition``); the whole dataset when not distributed.

    Partition here, not in oneshot: llm-compressor 0.14.0.1 detects identical datasets on all
    ranks and builds a sampler over the rank's slice, but its DataLoader indexes the whole
    dataset, so every rank reads the first 1/N of the samples.
    """
    if not is_distributed():
        return dataset
    rank, world = dist.get_rank(), dist.get_world_size()
    start, end = len(dataset) * rank // world, len(dataset) * (rank + 1) // world
    if end <= start:
        raise ValueError(
            f"{len(dataset)} calibration samples cannot be shared by {world} ranks (rank {rank} gets none); "
            "raise --num-samples to at least the number of processes"
        )
    return dataset.select(range(start, end))


# ---- statistics and decomposition ---------------------------------------------------------
def _backend_device() -> torch.device:
    """Where collectives run: the rank's accelerator for nccl/xccl, else the CPU."""
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    return torch.accelerator.current_accelerator(check_available=True)


def _comm(collective: Callable, tensor: torch.Tensor, **kwargs) -> None:
    """Run a collective in place on ``tensor``; through a contiguous copy on the backend's
    device where it lives elsewhere or is a strided view (SVD factors often are: a
    non-contiguous tensor is sent as its raw storage and arrives scrambled)."""
    device = _backend_device()
    if tensor.device.type == device.type and tensor.is_contiguous():
        collective(tensor, **kwargs)
        return
    staged = tensor.to(device).contiguous()  # .to(memory_format=...) may return the view itself
    collective(staged, **kwargs)
    tensor.copy_(staged)


def _fields(want: frozenset) -> list[tuple[str, dist.ReduceOp]]:
    """The InputStatistics tensors a method reads and how they combine across ranks."""
    fields = [("H", dist.ReduceOp.SUM)] if "H" in want else []
    if "abs" in want:
        fields += [("abs_sum", dist.ReduceOp.SUM), ("abs_max", dist.ReduceOp.MAX)]
    return fields


def _decomposition_cost(shapes: list[tuple[int, int]]) -> float:
    """Flops of one input group: the n x n whitening once, an SVD of each (m, n) member."""
    n = shapes[0][1]
    return n**3 + sum(m * n * min(m, n) for m, n in shapes)


def decompose_on_owners(
    jobs: dict[str, tuple[tuple[int, int], list]],
    want: frozenset,
    decompose: Callable[[str], tuple],
) -> dict[str, tuple]:
    """``{name: decompose(name)}`` for every job, computed once across all ranks.

    ``jobs``: ``{name: ((m, n), [InputStatistics read by decompose, the grouping one first])}``,
    in the same order on every rank. ``decompose(name)`` returns ``(Factors, seconds)``.
    Distributed: modules that share an input (same first statistics object) share an owner
    rank, which receives the statistics' sums (token counts go to every rank), decomposes,
    and broadcasts the factors; statistics on the other ranks are partial sums afterwards.
    """
    if not is_distributed():
        return {name: decompose(name) for name in jobs}
    rank, world = dist.get_rank(), dist.get_world_size()
    _check_same_jobs(list(jobs))
    groups: dict[int, list[str]] = {}
    for name, (_, stats) in jobs.items():
        groups.setdefault(id(stats[0]), []).append(name)
    keys = list(groups)  # insertion order: identical on every rank
    _, _, owner_of_group = greedy_bin_packing(
        list(keys), world, item_weight_fn=lambda key: _decomposition_cost([jobs[n][0] for n in groups[key]])
    )
    owner = {name: owner_of_group[key] for key in keys for name in groups[key]}

    _reduce_statistics(jobs, groups, keys, owner_of_group, want)
    results, error = {}, None
    for name in (n for n in jobs if owner[n] == rank):
        try:
            results[name] = decompose(name)
        except Exception as caught:  # every rank must learn of it, or they wait in the broadcast
            error = f"{name}: {type(caught).__name__}: {caught}"
            break
    return _broadcast_results(list(jobs), owner, results, error)


def _check_same_jobs(names: list[str]) -> None:
    """Every rank must decompose the same modules in the same order, or the collectives pair up
    wrongly (or wait forever): a module that saw calibration tokens on some ranks only (an MoE
    expert no token of a rank was routed to) is an error on every rank, not a hang."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, names)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            only = sorted(set(theirs) ^ set(everyone[0]))[:3]
            raise RuntimeError(
                f"torchrun ranks 0 and {rank} have different modules ready to decompose (e.g. {only}): a "
                "module saw calibration tokens on some ranks only; give every rank more samples "
                "(--num-samples) or compress in one process"
            )


def _reduce_statistics(jobs, groups, keys, owner_of_group, want) -> None:
    """Sum every rank's statistics into the owner's copy (GPTQ's reduce-to-owner)."""
    distinct: dict[int, tuple] = {}  # id -> (statistics, the ranks that read them)
    for key in keys:
        for stats in (s for name in groups[key] for s in jobs[name][1]):
            distinct.setdefault(id(stats), (stats, set()))[1].add(owner_of_group[key])
    # token counts: every rank records them; one small all-reduce
    tokens = torch.tensor([s.tokens for s, _ in distinct.values()], dtype=torch.int64)
    _comm(dist.all_reduce, tokens, op=dist.ReduceOp.SUM)
    for (stats, _), count in zip(distinct.values(), tokens.tolist()):
        stats.tokens = count
    for stats, readers in distinct.values():
        for field, op in _fields(want):
            if len(readers) == 1:
                _comm(dist.reduce, getattr(stats, field), dst=next(iter(readers)), op=op)
            else:  # read by two owners (never for the grouping built here, but cheap to allow)
                _comm(dist.all_reduce, getattr(stats, field), op=op)


def _broadcast_results(
    names: list[str], owner: dict[str, int], results: dict[str, tuple], error: str | None = None
) -> dict:
    """Every rank gets every (Factors, seconds): shapes first, then the tensors. A decomposition
    that failed on its owner (``error``) is raised on every rank."""
    from svdllm_plugin.modifiers.svd.decompose import Factors

    meta = {
        name: (tuple(f.W_u.shape), tuple(f.W_v.shape), len(f.sigma), f.W_u.dtype, f.loss, seconds)
        for name, (f, seconds) in results.items()
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (meta, error))
    failed = [(rank, e) for rank, (_, e) in enumerate(everyone) if e is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"decomposition failed on torchrun rank {rank}: {message}")
    meta = {name: info for part, _ in everyone for name, info in part.items()}
    device = _backend_device()
    out = {}
    for name in names:
        u_shape, v_shape, r, dtype, loss, seconds = meta[name]
        if name in results:
            factors = results[name][0]
        else:
            W_u, W_v, sigma = (torch.empty(s, dtype=dtype, device=device) for s in (u_shape, v_shape, r))
            factors = Factors(W_u, W_v, sigma, loss)
        for tensor in (factors.W_u, factors.W_v, factors.sigma):
            _comm(dist.broadcast, tensor, src=owner[name])
        out[name] = (factors, seconds)
    return out


# ---- other reductions ---------------------------------------------------------------------
def sum_over_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor across ranks in place (e.g. FWSVD's Fisher row importance)."""
    if is_distributed():
        for tensor in tensors.values():
            _comm(dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
    return tensors


def mean_over_ranks(value: float, weight: float) -> float:
    """The ``weight``-weighted mean of a per-rank mean ``value`` (e.g. a loss over batches)."""
    if not is_distributed():
        return value
    both = torch.tensor([value * weight, float(weight)], dtype=torch.float64)
    _comm(dist.all_reduce, both, op=dist.ReduceOp.SUM)
    return float(both[0] / both[1].clamp_min(1e-30))


# ---- saving -------------------------------------------------------------------------------
def save_on_source(save: Callable, model, *args, **kwargs):
    """``save(model, ...)`` on rank 0 only; the other ranks wait for it.

    ``svdllm_plugin.checkpoint.save_pretrained`` calls transformers' save itself, not
    llm-compressor's wrapped ``model.save_pretrained`` (whose barrier group every rank would
    have to join), so rank 0 saves alone.
    """
    if not is_distributed():
        return save(model, *args, **kwargs)
    result = None
    if is_source_process():
        result = save(model, *args, **kwargs)
    dist.barrier()
    return result
