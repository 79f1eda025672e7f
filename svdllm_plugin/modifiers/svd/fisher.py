"""FWSVD's Fisher row importance, layer by layer: O(one decoder layer) in memory.

For a Linear y = W x, dL/dW = sum_t g_t x_t^T (g = dL/dy), so each row's importance
I_i = sum over samples s of sum_j (dL_s/dW_ij)^2 needs only the Linear's input x and output
gradient g, never a weight gradient. FWSVD's Fisher is per sample: each sample's own loss
L_s (mean next-token loss over its non-padded tokens) is differentiated and its gradient
squared; squaring the gradient of a batch would square cross-sample sums.

A whole-model backward keeps every layer's onloaded weights and inputs until it runs. Here,
per calibration batch:

    forward   h_0 = embeddings(ids); h_{l+1} = layer_l(h_l) without autograd, keeping h_l only
    head      L = sum_s L_s from norm(h_L) and the LM head; g_L = dL/dh_L
    backward  for l = L-1 .. 0: rerun layer_l on h_l with autograd, backpropagate g_{l+1},
              read each Linear's (x, g) in its hooks, g_l = dL/dh_l

so at any time one decoder layer is onloaded (on the execution device, as the sequential
pipeline onloads it) and the held activations are the batch's layer inputs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from compressed_tensors.offload import disable_onloading, get_execution_device, set_onload_device
from torch import nn
from tqdm import tqdm

__all__ = ["fisher_by_layer", "execution_device", "per_sample_loss"]


class _Stop(Exception):
    """Raised by the first decoder layer's pre-hook once its inputs are captured."""


def per_sample_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """sum over samples of each sample's mean next-token loss; padded positions are no labels."""
    labels = input_ids.masked_fill(attention_mask == 0, -100) if attention_mask is not None else input_ids
    labels = labels[:, 1:]  # (b, t - 1)
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )  # (b, t - 1)
    counts = (labels != -100).sum(1).clamp_min(1)  # (b,)
    return (nll.sum(1) / counts).sum()


def execution_device(model: nn.Module) -> torch.device:
    """The device the sequential pipeline will onload layers to; prepared now (the pipeline does
    the same ``set_onload_device`` later), so this pass runs there too."""
    from llmcompressor.utils.dev import get_main_device

    device = get_main_device()
    if get_execution_device(model.get_input_embeddings()) != device:
        set_onload_device(model, device)
    return device


def _first_layer_inputs(model: nn.Module, first: nn.Module, batch: dict) -> tuple[tuple, dict]:
    """(args, kwargs) the decoder passes its first layer (hidden states, mask, RoPE, ...)."""
    captured = {}

    def catch(module, args, kwargs):
        captured["inputs"] = (args, kwargs)
        raise _Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            model.get_decoder()(**batch, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["inputs"]


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The causal LM head on the last hidden states: final norm, LM head, the model's logit scaling."""
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is None:
        raise ValueError(
            f"row_weighting: fisher runs the LM head itself, but {type(model).__name__}'s decoder has no "
            "final `norm`; use `row_weighting: none`"
        )
    logits = model.get_output_embeddings()(norm(h))  # (b, t, vocab)
    if getattr(model, "logit_scale", None) is not None:  # Cohere
        logits = logits * model.logit_scale
    softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _observe(importance: dict[str, torch.Tensor], name: str):
    """Forward hook: when the output is part of a graph, add each sample's sum_j (g^T x)_ij^2."""

    def hook(module, args, output):
        if not output.requires_grad:
            return
        x = args[0].detach()  # (b, t, n)

        def accumulate(g):  # g: dL/d output, (b, t, m)
            I = importance[name]
            for x_s, g_s in zip(x.flatten(1, -2), g.flatten(1, -2)):  # (t, n), (t, m) per sample
                G = g_s.T.double() @ x_s.double()  # (m, n): this sample's dL_s/dW
                I += G.pow(2).sum(1).to(I.device)

        output.register_hook(accumulate)

    return hook


def fisher_by_layer(
    model: nn.Module, linears: dict[str, nn.Linear], batches: Iterable[dict], layers: list[nn.Module]
) -> dict[str, torch.Tensor]:
    """I_i per row of every given Linear, summed over the batches' samples (see the module docstring).

    ``batches``: dicts with ``input_ids`` (and ``attention_mask``) on the execution device;
    ``layers``: the decoder layers in forward order.
    """
    importance = {name: torch.zeros(lin.out_features, dtype=torch.float64) for name, lin in linears.items()}
    handles = [lin.register_forward_hook(_observe(importance, name)) for name, lin in linears.items()]
    with disable_onloading():  # flip the stored parameters' flags without reading them
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in flags:
            p.requires_grad_(False)
    try:
        for batch in tqdm(list(batches), desc="FWSVD Fisher (layer-wise)"):
            _one_batch(model, layers, batch)
    finally:
        for handle in handles:
            handle.remove()
        with disable_onloading():
            for p, flag in flags.items():
                p.requires_grad_(flag)
    return importance


def _one_batch(model: nn.Module, layers: list[nn.Module], batch: dict) -> None:
    args, kwargs = _first_layer_inputs(model, layers[0], batch)
    device = _hidden(args, kwargs).device
    store = torch.device("cpu")  # held layer inputs wait off the accelerator, as the pipeline's do
    hidden = [_hidden(args, kwargs).detach().to(store)]  # h_0 .. h_L, (b, t, d) each
    with torch.no_grad():
        for layer in layers:
            a, k = _with_hidden(args, kwargs, hidden[-1].to(device))
            hidden.append(_output(layer(*a, **k)).detach().to(store))
    with torch.enable_grad():
        h = hidden.pop().to(device).requires_grad_(True)
        loss = per_sample_loss(_logits(model, h), batch["input_ids"], batch.get("attention_mask"))
        (g,) = torch.autograd.grad(loss, h)  # (b, t, d)
        del loss, h
        for layer in reversed(layers):
            x = hidden.pop().to(device).requires_grad_(True)
            a, k = _with_hidden(args, kwargs, x)
            (g,) = torch.autograd.grad(_output(layer(*a, **k)), x, grad_outputs=g)  # the Linears' hooks read
