"""Whole-model passes some methods need besides the sequential pipeline's hooks:
FWSVD's Fisher row importance (backward passes), original-activation statistics for the
closed-form update, and ASVD's per-layer perplexity sensitivity."""

from __future__ import annotations

import contextlib
import math
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Subset
from tqdm import tqdm

from svdllm_plugin import distributed
from svdllm_plugin.modifiers.svd import fisher
from svdllm_plugin.modifiers.svd.original import decoder_layers
from svdllm_plugin.modifiers.svd.statistics import StatisticsCollector

__all__ = ["fisher_row_importance", "collect_statistics", "calibration_loss"]


def _batches(dataloader, limit: int | None, device):
    if dataloader is None:
        raise ValueError("this method needs calibration data: pass a dataset to oneshot")
    for batch in islice(_in_order(dataloader), limit):
        yield {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def _in_order(dataloader):
    """The calibration batches in dataset order. llmcompressor shuffles calibration samples with an
    unseeded ``RandomSampler`` (``shuffle_calibration_samples`` defaults to true), so the first
    ``limit`` batches of the dataloader itself differ from process to process, and so would
    Fisher row weights and sensitivity perplexities computed on them."""
    sampler = getattr(dataloader, "sampler", None)
    if not isinstance(sampler, RandomSampler):
        return dataloader
    dataset = dataloader.dataset
    return DataLoader(
        Subset(dataset, range(min(len(sampler), len(dataset)))),
        batch_size=dataloader.batch_size,
        collate_fn=dataloader.collate_fn,
        shuffle=False,
    )


def _device(model: nn.Module):
    """Where inputs go: the embedding's execution device (onload device when offloaded)."""
    from compressed_tensors.offload import get_execution_device

    return get_execution_device(model.get_input_embeddings())


def fisher_row_importance(model: nn.Module, linears: dict[str, nn.Linear], dataloader, limit: int) -> dict:
    """I_i = sum over samples of sum_j (dL_s/dW_ij)^2 for every row i of every given Linear, from
    the first ``limit`` calibration batches: layer by layer on the execution device, in
    O(one decoder layer) of memory (``fisher.py``)."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            "row_weighting: fisher (and method: fwsvd) runs the backward layer by layer, but the model "
            "names no decoder layers (model._no_split_modules); use `row_weighting: none`"
        )
    device = fisher.execution_device(model)
    return fisher.fisher_by_layer(model, linears, _batches(dataloader, limit, device), layers)


@torch.no_grad()
def collect_statistics(model: nn.Module, layers: dict[str, nn.Module], dataloader) -> StatisticsCollector:
    """X X^T of every layer's input on the model as it is (dense), in one forward pass each batch."""
    collector = StatisticsCollector(names={m: n for n, m in layers.items()})
    handles = [layer.register_forward_pre_hook(collector) for layer in layers.values()]
    try:
        for batch in tqdm(list(_batches(dataloader, None, _device(model))), desc="Original statistics"):
            model(**batch)
            collector.release_input()
    finally:
        for handle in handles:
            handle.remove()
    return collector


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: list[dict]) -> float:
    """Mean next-token loss over the given batches; perplexity is exp of it.

    Runs the decoder and applies the lm_head weight itself: inside llmcompressor's
    calibration context the lm_head's forward is patched to return meta tensors.
    """
    head = model.get_output_embeddings()
    total = 0.0
    for batch in batches:
        hidden = model.get_decoder()(**batch).last_hidden_state  # (b, t, d)
        logits = F.linear(hidden, head.weight, head.bias).float()  # (b, t, vocab)
        labels = batch["input_ids"][:, 1:]
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten()))
    return distributed.mean_over_ranks(total / max(len(batches), 1), len(batches))


def perplexity_batches(model: nn.Module, dataloader, limit: int) -> list[dict]:
    return list(_batches(dataloader, limit, _device(model)))


def safe_exp(x: float) -> float:
    return math.exp(min(x, 700.0))


@contextlib.contextmanager
def replaced_output(layer: nn.Module, W: torch.Tensor):
    """Within the block, ``layer`` computes x W^T (+ its bias) instead of its own product."""
    bias = getattr(getattr(layer, "svd_u", layer), "bias", None)

    def hook(module, args, output):
        return F.linear(args[0], W, bias)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
