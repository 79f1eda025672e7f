"""Text cut into token windows: random (calibration), consecutive (evaluation) or spread evenly.

Every window is cut by ``windows_at``; every window length is checked by ``check_seq_len``.
"""

from __future__ import annotations

import datasets
import torch
from loguru import logger

__all__ = [
    "MIN_SEQ_LEN",
    "check_seq_len",
    "token_ids",
    "windows_at",
    "calibration_dataset",
    "eval_windows",
    "spread_windows",
]

MIN_SEQ_LEN = 2  # one token predicts the next
_TOKENIZE_CHUNK_CHARS = 64_000


def _chunks(text: str, size: int = _TOKENIZE_CHUNK_CHARS) -> list[str]:
    """Pieces of about ``size`` chars, each cut just before a paragraph break.

    A fast tokenizer encodes a batch of pieces in parallel, and no single call sees a
    sequence far over the model's maximum length.
    """
    chunks, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n\n", start + size)
        if cut < 0:
            break
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` (no special tokens), as one 1-D LongTensor."""
    if not text:
        return torch.empty(0, dtype=torch.long)
    # verbose=False: the "sequence length is longer than the specified maximum" warning is
    # expected here, the windows are cut afterwards
    encoded = tokenizer(_chunks(text), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([i for ids in encoded for i in ids], dtype=torch.long)


def _check_at_least(value: int, minimum: int, name: str, option: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` ({option}) must be an integer >= {minimum}; got {value!r}")


def check_seq_len(seq_len: int, option: str = "--seq-len") -> int:
    """The one check of a window length: an integer >= 2 (``option`` names it in the message)."""
    _check_at_least(seq_len, MIN_SEQ_LEN, "seq_len", option)
    return seq_len


def windows_at(ids: torch.Tensor, starts, seq_len: int) -> torch.Tensor:
    """The windows ids[s : s + seq_len] of the 1-D ``ids`` at each start s:
    LongTensor (len(starts), seq_len)."""
    return torch.stack([ids[s : s + seq_len] for s in starts])


def calibration_dataset(
    tokenizer, text: str, num_samples: int, seq_len: int, seed: int = 0
) -> datasets.Dataset:
    """``num_samples`` windows of ``seq_len`` tokens at seeded random offsets of ``text``.

    Columns ``input_ids`` and ``attention_mask`` (all ones: no padding), ready for
    ``llmcompressor.oneshot(dataset=...)``.
    """
    _check_at_least(num_samples, 1, "num_samples", "--num-samples")
    check_seq_len(seq_len)
    ids = token_ids(tokenizer, text)  # (N,)
    n = ids.numel()
    if n < seq_len + 1:
        raise ValueError(
            f"the calibration text has {n} tokens, fewer than --seq-len + 1 = {seq_len + 1}; "
            "give more text or a smaller --seq-len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (num_samples,), generator=generator)
    windows = windows_at(ids, starts.tolist(), seq_len)  # (num_samples, seq_len)
    if num_samples * seq_len > n:
        logger.warning(
            "Calibration: {} windows x {} tokens need {:,} tokens but the text has {:,}: the windows "
            "overlap (the same tokens are counted more than once); give more text or lower "
            "--num-samples / --seq-len",
            num_samples,
            seq_len,
            num_samples * seq_len,
            n,
        )
    logger.info("Calibration: {} windows of {} tokens from {:,} tokens", num_samples, seq_len, n)
    return datasets.Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )


def eval_windows(
    tokenizer, text: str, seq_len: int, max_windows: int | None = None, option: str = "--max-windows"
) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of ``text``: LongTensor (W, seq_len).

    ``option`` names ``max_windows`` in error messages (``svdllm compress`` calls it --eval-windows).
    """
    check_seq_len(seq_len)
    if max_windows is not None:
        _check_at_least(max_windows, 1, "max_windows", option)
    ids = token_ids(tokenizer, text)
    W = ids.numel() // seq_len
    if W < 1:
        raise ValueError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    if max_windows is not None:
        W = min(W, max_windows)
    return windows_at(ids, range(0, W * seq_len, seq_len), seq_len)  # consecutive


def spread_windows(tokenizer, text: str, seq_len: int, count: int) -> torch.Tensor:
    """``count`` windows of ``seq_len`` tokens at evenly spaced offsets over the whole text
    (not only its first licenses): LongTensor (count, seq_len)."""
    check_seq_len(seq_len)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    if ids.numel() < seq_len:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    starts = torch.linspace(0, ids.numel() - seq_len, count).long()
    return windows_at(ids, starts.tolist(), seq_len)
