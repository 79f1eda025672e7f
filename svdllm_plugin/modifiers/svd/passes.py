"""Whole-model passes some methods need besides the sequential pipeline's hooks:
FWSVD's Fisher row importance (backward passes), original-activation statistics for the
closed-form update, and ASVD's per-layer perplexity sensitivity."""

from __future__ import annotations

import contextlib
import math
from itertools import islice

import torch
import torch.nn.functional as F
from compressed_tensors.offload import disable_onloading
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Subset
from tqdm import tqdm

from svdllm_plugin.modifiers.svd import distributed
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
    """I_i = sum over batches of sum_j (dL/dW_ij)^2 for every row i of every given Linear.

    Computed from each Linear's input x and output gradient g, dL/dW = sum_t g_t x_t^T, so no
    weight gradient is needed: with offloading, a weight's ``.grad`` would land on a temporary
    onloaded copy. Memory: autograd keeps the onloaded weight of every Linear until the
    backward of the batch, so this pass holds the model's weights once (where they onload:
    the GPU with sequential onloading) plus one batch's activations; it is the one pass of
    the modifier that does not run in O(one decoder layer).
    """
    importance = {name: torch.zeros(lin.out_features, dtype=torch.float64) for name, lin in linears.items()}

    def observe(name):
        def hook(module, args, output):
            x = args[0].detach()

            def accumulate(g):  # g: dL/d output, (..., m); x: (..., n)
                G = g.reshape(-1, g.shape[-1]).T.double() @ x.reshape(-1, x.shape[-1]).double()  # (m, n)
                importance[name] += G.pow(2).sum(1).cpu()

            output.register_hook(accumulate)

        return hook

    def needs_grad(module, args, output):  # gradients flow from the embeddings on, to no weight
        return output.requires_grad_(True)

    handles = [lin.register_forward_hook(observe(name)) for name, lin in linears.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(needs_grad))
    with disable_onloading():  # flip the stored parameters' flags without reading them
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in flags:
            p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for batch in tqdm(list(_batches(dataloader, limit, _device(model))), desc="FWSVD Fisher"):
                model(**batch, labels=batch["input_ids"]).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        with disable_onloading():
            for p, flag in flags.items():
                p.requires_grad_(flag)
    return importance


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
