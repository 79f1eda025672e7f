"""Held-out validation / test splits (data/splits.py), as the budget search uses them."""

from __future__ import annotations

from svdllm_plugin.data import held_out_splits, load_text, other_domain_text, spread_splits


def test_held_out_splits_are_disjoint(tokenizer):
    held = held_out_splits(tokenizer, load_text(None, "evaluation"), 64, 8)
    other = spread_splits(tokenizer, other_domain_text(), 64, 8)
    for splits in (held, other):
        assert splits["validation"].shape == splits["test"].shape == (8, 64)
        rows = {tuple(r.tolist()) for s in splits.values() for r in s}
        assert len(rows) == 16  # no window in both
    calibration = load_text(None, "calibration")  # other modules of the standard library
    test_text = tokenizer.decode(held["test"][0])
    assert test_text[:200] not in calibration
