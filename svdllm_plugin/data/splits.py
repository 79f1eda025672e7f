"""Validation and test windows: choose settings on one split, report them on the other.

Held-out windows of the evaluation text are cut consecutively and halved; windows of another
domain (``other_domain_text``) are spread over the whole text and dealt alternately.
"""

from __future__ import annotations

import torch
from loguru import logger

from svdllm_plugin.data.windows import _check_at_least, check_seq_len, eval_windows, windows_at

__all__ = ["HELD_OUT_SPLITS", "held_out_splits", "spread_splits"]

HELD_OUT_SPLITS = ("validation", "test")  # of the held-out windows: choose on one, report on the other


def _halves(windows: torch.Tensor, what: str) -> dict[str, torch.Tensor]:
    if windows.shape[0] < 2:
        raise ValueError(
            f"the {what} has {windows.shape[0]} window, and validation and test need one each; "
            "give more text or a smaller --seq-len"
        )
    half = windows.shape[0] // 2
    return {"validation": windows[:half], "test": windows[half:]}


def held_out_splits(tokenizer, text: str, seq_len: int, count: int, option: str = "--eval-windows"):
    """Disjoint validation and test windows of the evaluation text: {"validation": (V, seq_len),
    "test": (T, seq_len)}, each up to ``count`` windows.

    Consecutive non-overlapping windows from the start of ``text``: the first half validation, the
    second test (the embedded text's evaluation modules are in path order, so the two halves come
    from different modules). Neither overlaps calibration, which reads another split of the text.
    """
    _check_at_least(count, 1, "count", option)
    windows = eval_windows(tokenizer, text, seq_len, 2 * count, option=option)
    if windows.shape[0] < 2 * count:
        logger.warning(
            "the evaluation text has {} windows of {} tokens, fewer than 2 x {}: validation and test "
            "get half each",
            windows.shape[0],
            seq_len,
            count,
        )
    return _halves(windows, "evaluation text")


def spread_splits(tokenizer, text: str, seq_len: int, count: int) -> dict[str, torch.Tensor]:
    """Disjoint validation and test windows spread over ``text`` (e.g. ``other_domain_text``):
    2 x ``count`` evenly spaced windows, alternately validation and test; they overlap nowhere
    (fewer windows where the text is too short for that)."""
    check_seq_len(seq_len)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    fits = ids.numel() // seq_len  # non-overlapping windows the text holds
    total = min(2 * count, fits)
    if total < 2:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than two windows of {seq_len}")
    starts = torch.linspace(0, ids.numel() - seq_len, total).long()  # spacing >= seq_len
    windows = windows_at(ids, starts.tolist(), seq_len)
    return {"validation": windows[0::2], "test": windows[1::2]}
