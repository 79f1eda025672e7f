"""Perplexity of a causal LM on fixed token windows (see ``data.eval_windows``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = ["perplexity", "evaluate_perplexity"]


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


def evaluate_perplexity(model: str, dataset: str | None, seq_len: int, max_windows: int, device) -> dict:
    """``svdllm eval``: perplexity of the model or folder ``model`` on ``max_windows`` held-out windows
    of ``seq_len`` tokens of ``dataset``, on ``device`` (checked): {"model", "perplexity", "windows",
    "seq_len"}. The text and the sequence length are checked before the weights load."""
    from svdllm_plugin.data import eval_windows, load_text
    from svdllm_plugin.models import check_model, check_seq_len, load_model_and_tokenizer

    path = check_model(model)
    text = load_text(dataset, "evaluation")  # read before the weights load
    check_seq_len(path, seq_len)
    lm, tokenizer = load_model_and_tokenizer(path, check=False)
    lm.to(device)
    windows = eval_windows(tokenizer, text, seq_len, max_windows)
    return {
        "model": model,
        "perplexity": perplexity(lm, windows),
        "windows": int(windows.shape[0]),
        "seq_len": seq_len,
    }
