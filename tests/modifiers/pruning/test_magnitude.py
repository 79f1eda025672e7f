"""OneshotMagnitudePruningModifier (modifiers/pruning/magnitude.py) through its llmcompressor lifecycle
on small models; its order against SVDLLMModifier in a recipe is in tests/test_recipes.py."""

from __future__ import annotations

import pytest
import torch
from llmcompressor.core import Event, EventType, State
from pydantic import ValidationError
from torch import nn

from svdllm_plugin.layers import SVDLinear, replace_module
from svdllm_plugin.modifiers.pruning import OneshotMagnitudePruningModifier
from svdllm_plugin.modifiers.pruning.magnitude import magnitude_mask


def _run(modifier: OneshotMagnitudePruningModifier, model: nn.Module) -> None:
    state = State(model=model)
    modifier.initialize(state)
    for event in (EventType.CALIBRATION_START, EventType.SEQUENTIAL_EPOCH_END, EventType.CALIBRATION_END):
        modifier.update_event(state, Event(type_=event), modules=list(model.modules()))
    modifier.finalize(state)


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(16, 32))
    model.add_module("down", nn.Linear(32, 16))
    model.add_module("lm_head", nn.Linear(16, 8))
    return model


def test_magnitude_mask_unstructured_and_n_m():
    W = torch.tensor([[4.0, -1.0, 3.0, 0.5, -2.0, 6.0, 0.1, -5.0]])
    pruned = lambda mask: mask[0].nonzero().flatten().tolist()  # noqa: E731
    assert pruned(magnitude_mask(W, 0.5)) == [1, 3, 4, 6]
    assert pruned(magnitude_mask(W, 0.5, (2, 4))) == [1, 3, 4, 6]
    assert pruned(magnitude_mask(W, 0.25, (1, 4))) == [3, 6]
    assert pruned(magnitude_mask(W, 0.25)) == [3, 6]


@pytest.mark.parametrize("structure, sparsity", [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", 0.5)])
def test_magnitude_modifier_prunes_in_oneshot(structure, sparsity):
    model = _small_model()
    before = {n: m.weight.detach().clone() for n, m in model.named_children()}
    modifier = OneshotMagnitudePruningModifier(sparsity=sparsity, mask_structure=structure)
    _run(modifier, model)
    for name in ("up", "down"):
        W, W0 = model.get_submodule(name).weight.detach(), before[name]
        assert int((W == 0).sum(dim=1).min()) == round(sparsity * W.shape[1])  # every row
        kept = W != 0
        assert torch.equal(W[kept], W0[kept])  # survivors unchanged
        if structure == "unstructured":  # the zeroed weights are the smallest of their row
            pruned_max = W0.abs().masked_fill(kept, -1.0).amax(dim=1)
            kept_min = W0.abs().masked_fill(~kept, float("inf")).amin(dim=1)
            assert bool((pruned_max <= kept_min).all())
        else:
            assert bool(((W == 0).reshape(W.shape[0], -1, 4).sum(dim=2) == 2).all())
    assert torch.equal(model.lm_head.weight, before["lm_head"])  # ignored by default
    assert [r["name"] for r in modifier.records] == ["up", "down"]


def test_magnitude_round_trip():
    modifier = OneshotMagnitudePruningModifier(sparsity=0.5, mask_structure="2:4", targets="re:.*up$")
    again = OneshotMagnitudePruningModifier.model_validate(modifier.model_dump())
    assert again == modifier and again.targets == ["re:.*up$"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=0.0), r"`sparsity` .* must be in \(0, 1\); got 0.0"),
        (dict(sparsity=1.5), r"must be in \(0, 1\); got 1.5"),
        (dict(sparsity=0.5, mask_structure="2-4"), "`mask_structure` must be 'unstructured' or 'N:M'"),
        (dict(sparsity=0.5, mask_structure="4:2"), "0 < N < M"),
        (dict(sparsity=0.5, mask_structure="0:4"), "got '0:4'"),
        (dict(sparsity=0.6, mask_structure="2:4"), "zeroes 2 of every 4 weights, sparsity 0.5; got 0.6"),
        (dict(sparsity=0.5, ratio=0.5), "Extra inputs are not permitted"),
        (dict(), "sparsity"),
    ],
)
def test_magnitude_invalid_settings(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        OneshotMagnitudePruningModifier(**kwargs)


def test_magnitude_targets_matching_nothing():
    modifier = OneshotMagnitudePruningModifier(sparsity=0.5, targets=["re:.*no_such_layer$"])
    with pytest.raises(ValueError, match="no Linear modules matching.*check `targets`"):
        modifier.initialize(State(model=_small_model()))


def test_magnitude_n_m_needs_whole_groups():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 6), nn.Linear(6, 4))
    before = [m.weight.detach().clone() for m in model]
    with pytest.raises(ValueError, match="2: mask_structure '2:4' needs .* multiple of 4; got 6"):
        _run(OneshotMagnitudePruningModifier(sparsity=0.5, mask_structure="2:4", ignore=[]), model)
    assert all(torch.equal(m.weight, W) for m, W in zip(model, before))  # nothing pruned


def test_magnitude_refuses_pending_factors():
    model = _small_model()
    replace_module(model, "up", SVDLinear.from_linear(model.up, 8))  # pending: no factors yet
    with pytest.raises(ValueError, match="put SVDLLMModifier before it in the recipe"):
        _run(OneshotMagnitudePruningModifier(sparsity=0.5), model)
