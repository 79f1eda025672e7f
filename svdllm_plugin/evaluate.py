"""Perplexity of a causal LM on fixed token windows (see ``data.eval_windows``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = ["perplexity"]


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def perplexity(
    model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "Perplexity"
) -> float:
    """exp(mean next-token NLL) over every predicted token of every window.

    ``windows`` is a LongTensor (W, seq_len); each window predicts its tokens 1..seq_len-1.
    The NLL is summed in float64, so the result does not depend on ``batch_size``.
    """
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a (W >= 1, seq_len >= 2) tensor; got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size}")
    model.eval()
    device = _device(model)
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress):
            batch = windows[start : start + batch_size].to(device)  # (b, L)
            logits = model(input_ids=batch).logits[:, :-1].float()  # (b, L-1, V)
            targets = batch[:, 1:]  # (b, L-1)
            token_nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            nll += token_nll.double().sum().cpu()
            count += targets.numel()
    ppl = math.exp(nll.item() / count)
    if not math.isfinite(ppl):
        raise ValueError(
            f"perplexity is {ppl} (mean NLL {nll.item() / count}): the model produced non-finite or huge "
            "logits; a broken compression (NaN/inf weights) or float16 overflow is the likely cause; "
            "try float32 or a milder compression"
        )
    return ppl
