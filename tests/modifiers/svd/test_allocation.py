"""Rank allocation (allocation.py): by loss, by sensitivity, SVD-LLM V2's published formula, the
global allocation by absolute loss; and the Fisher row weights (FWSVD) combined with whitening."""

from __future__ import annotations

import math

import pytest
import torch
from support import run_oneshot

from svdllm_plugin.layers import factorized_ranks
from svdllm_plugin.modifiers.svd import SVDLLMModifier
from svdllm_plugin.modifiers.svd.allocation import (
    Matrix,
    allocate_by_loss,
    allocate_by_sensitivity,
    allocate_global,
    allocate_v2,
    matrix_type,
)
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


def test_fisher_rows_combine_with_whitening(tiny_dir, calib):
    """With row weights D (sqrt of the whole-model Fisher of the first 2 samples) the factors
    minimise the row-weighted whitened loss ||D (W - W_u W_v) X||: lower there than the plain
    factors', and higher in the plain loss ||(W - W_u W_v) X||, which the plain factors minimise."""
    from transformers import AutoModelForCausalLM

    name = "model.layers.0.mlp.up_proj"  # its inputs X are the dense model's (layer 0, before q..o)
    reference, plain, weighted = (AutoModelForCausalLM.from_pretrained(tiny_dir) for _ in range(3))
    batches = [{k: torch.tensor([calib[i][k]]) for k in ("input_ids", "attention_mask")} for i in range(2)]
    I = _autograd_fisher(reference, batches, [name])[name]  # (m,)
    D = I.clamp_min(1e-12 * I.max()).sqrt()
    inputs = []
    hook = reference.get_submodule(name).register_forward_hook(lambda m, a, out: inputs.append(a[0][0]))
    with torch.no_grad():
        for sample in calib:
            reference(torch.tensor([sample["input_ids"]]))
    hook.remove()
    X = torch.cat(inputs).double().T  # (n, tokens)
    W = reference.get_submodule(name).weight.detach().double()  # (m, n)
    run_oneshot(plain, calib, SVDLLMModifier(ratio=0.4))
    run_oneshot(weighted, calib, SVDLLMModifier(ratio=0.4, row_weighting="fisher", fisher_batches=2))

    def loss(model, rows: torch.Tensor) -> float:
        E = (W - model.get_submodule(name).dense().detach().double()) @ X  # (m, tokens)
        return float((rows[:, None] * E).pow(2).sum())

    assert plain.get_submodule(name).rank == weighted.get_submodule(name).rank
    assert loss(weighted, D) < loss(plain, D)
    assert loss(plain, torch.ones_like(D)) < loss(weighted, torch.ones_like(D))
    with pytest.raises(ValueError, match="row_weighting"):
        SVDLLMModifier(update="output", row_weighting="fisher")


def _autograd_fisher(model, batches: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """The whole-model reference: one forward + backward per sample (batch size 1), with weight
    gradients from autograd, I_i = sum over samples of sum_j (dL/dW_ij)^2."""
    linears = {name: model.get_submodule(name) for name in names}
    importance = {name: torch.zeros(lin.out_features, dtype=torch.float64) for name, lin in linears.items()}
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            ids = ids[mask.bool()][None]  # this sample alone, its padding dropped
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            for name, lin in linears.items():
                importance[name] += lin.weight.grad.double().pow(2).sum(1)
    model.zero_grad()
    return importance


def _names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def test_layerwise_fisher_equals_autograd_at_batch_size_1(tiny):
    """The layer-by-layer pass gives the per-row sums of squared weight gradients that a whole-model
    backward gives, sample by sample."""
    from svdllm_plugin.modifiers.svd.passes import fisher_row_importance

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (1, 24), generator=g)} for _ in range(3)]
    for batch in batches:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    names = _names(tiny)
    expected = _autograd_fisher(tiny, batches, names)
    got = fisher_row_importance(tiny, {n: tiny.get_submodule(n) for n in names}, batches, limit=3)
    assert all(p.requires_grad for p in tiny.parameters())  # flags restored
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-12)


def test_fisher_is_per_sample_and_ignores_padding(tiny):
    """A batch of two samples, the second right-padded: each sample's own gradient is squared
    (not the batch's), and padded positions are no labels. Equal to the two samples alone."""
    from svdllm_plugin.modifiers.svd.passes import fisher_row_importance

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 16:] = 0
    ids[1, 16:] = 0  # a pad token id
    names = _names(tiny)
    expected = _autograd_fisher(tiny, [{"input_ids": ids, "attention_mask": mask}], names)
    linears = {n: tiny.get_submodule(n) for n in names}
    got = fisher_row_importance(tiny, linears, [{"input_ids": ids, "attention_mask": mask}], limit=1)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-12)


def test_modifier_row_weights_are_the_whole_model_fisher(tiny_dir, calib):
    """Through oneshot (batch size 1): the modifier's row weights are sqrt of the whole-model
    autograd Fisher of the first ``fisher_batches`` calibration samples, so the factors are too."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_dir)
    batches = [{k: torch.tensor([calib[i][k]]) for k in ("input_ids", "attention_mask")} for i in range(2)]
    expected = _autograd_fisher(reference, batches, _names(reference))
    modifier = SVDLLMModifier(ratio=0.4, row_weighting="fisher", fisher_batches=2)
    run_oneshot(AutoModelForCausalLM.from_pretrained(tiny_dir), calib, modifier)
    assert set(modifier._row_scale) == set(expected)
    for name, I in expected.items():
        row_scale = I.clamp_min(1e-12 * I.max().clamp_min(1e-30)).sqrt()
        torch.testing.assert_close(modifier._row_scale[name], row_scale, rtol=1e-4, atol=1e-12)


def _matrices():
    g = torch.Generator().manual_seed(5)
    flat, steep = (
        torch.linspace(1, 0.5, 32, dtype=torch.float64),
        torch.logspace(0, -4, 32, dtype=torch.float64),
    )
    return [
        Matrix("model.layers.0.mlp.up_proj", 32, 32, flat),
        Matrix("model.layers.1.mlp.up_proj", 32, 32, steep),
        Matrix(
            "model.layers.0.self_attn.q_proj",
            32,
            32,
            torch.rand(32, generator=g).sort(descending=True).values,
        ),
    ]


def test_loss_allocation_keeps_each_type_budget_and_moves_rank_to_flat_spectra():
    mats = _matrices()
    uniform = {m.name: 8 for m in mats}
    ranks = allocate_by_loss(mats, uniform)
    assert ranks["model.layers.0.mlp.up_proj"] + ranks["model.layers.1.mlp.up_proj"] == 16
    assert ranks["model.layers.0.mlp.up_proj"] > ranks["model.layers.1.mlp.up_proj"]
    assert ranks["model.layers.0.self_attn.q_proj"] == 8  # alone in its type
    assert matrix_type("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"


def test_sensitivity_allocation_meets_target_within_one_rank_step():
    mats = _matrices()
    ppl = {m.name: {r: 10 + 100 * r * (i + 1) for r in (0.1, 0.3, 0.5, 0.7, 0.9)} for i, m in enumerate(mats)}
    target = 3 * 32 * 32 // 2  # remove half of all parameters
    ranks = allocate_by_sensitivity(mats, ppl, target)
    removed = sum(m.m * m.n - ranks[m.name] * (m.m + m.n) for m in mats)
    assert 0 <= removed - target < 64  # within one rank step (m + n = 64)
    assert ranks[mats[0].name] < ranks[mats[2].name]  # the less sensitive matrix is cut more
