"""SVD-LLM V2's published allocation, the global allocation by absolute loss, Fisher row
weighting combined with whitening."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_oneshot

from svdllm_plugin.layers import factorized_ranks
from svdllm_plugin.modifiers.svd import SVDLLMModifier
from svdllm_plugin.modifiers.svd.allocation import Matrix, allocate_global, allocate_v2
from svdllm_plugin.modifiers.svd.decompose import params_of, truncation_loss


def spectra(scales, n=64):
    base = torch.logspace(1, -1, n, dtype=torch.float64)
    return [Matrix(f"model.layers.{i}.mlp.up_proj", n, n, s * base) for i, s in enumerate(scales)]


def test_v2_follows_the_published_formula():
    mats = spectra([1.0, 3.0, 10.0])
    uniform = {m.name: 16 for m in mats}
    ranks = allocate_v2(mats, uniform, ratio=0.5, multiple=1)
    losses = [truncation_loss(m.sigma, 16) for m in mats]
    inv = [1 / math.log(L) for L in losses]
    for m, w in zip(mats, inv):
        R = 3 * 0.5 * w / sum(inv)
        assert abs(ranks[m.name] - 64 * 64 * (1 - R) / 128) <= 1
    assert ranks[mats[2].name] > ranks[mats[0].name]  # larger loss: smaller ratio, larger rank
    total = sum(params_of(64, 64, k) for k in ranks.values())
    assert abs(total - 3 * params_of(64, 64, 16)) <= 3 * 128  # the type's budget, up to rounding


def test_global_allocation_moves_rank_across_types_by_absolute_loss():
    big = Matrix("model.layers.0.mlp.down_proj", 64, 64, 10 * torch.logspace(1, -1, 64, dtype=torch.float64))
    small = Matrix("model.layers.0.self_attn.q_proj", 64, 64, torch.logspace(1, -1, 64, dtype=torch.float64))
    uniform = {big.name: 16, small.name: 16}
    ranks = allocate_global([big, small], uniform, multiple=1, spread=0.5)
    assert ranks[big.name] == 24 and ranks[small.name] == 8  # bounded at 1.5x / 0.5x uniform
    assert sum(params_of(64, 64, k) for k in ranks.values()) <= 2 * params_of(64, 64, 16)


@pytest.mark.parametrize("allocation", ["v2", "global"])
def test_allocations_run_and_keep_the_budget(tiny, calib, allocation):
    modifier = SVDLLMModifier(ratio=0.4, allocation=allocation)
    run_oneshot(tiny, calib, modifier)
    ranks = factorized_ranks(tiny)
    assert len(ranks) == 14
    after = sum(r["params_after"] for r in modifier.records)
    before = sum(r["params_before"] for r in modifier.records)
    assert 1 - after / before == pytest.approx(0.4, abs=0.05)
    if allocation == "global":
        assert len(set(ranks.values())) > 3  # not uniform


def test_fisher_rows_combine_with_whitening(tiny_factory, calib, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_factory().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    plain, weighted = (AutoModelForCausalLM.from_pretrained(tmp_path) for _ in range(2))
    run_oneshot(plain, calib, SVDLLMModifier(ratio=0.4))
    run_oneshot(weighted, calib, SVDLLMModifier(ratio=0.4, row_weighting="fisher", fisher_batches=2))
    a = plain.model.layers[0].mlp.up_proj.dense()
    b = weighted.model.layers[0].mlp.up_proj.dense()
    assert not torch.allclose(a, b)  # the row weights changed the truncation
    with pytest.raises(ValueError, match="row_weighting"):
        SVDLLMModifier(update="output", row_weighting="fisher")
