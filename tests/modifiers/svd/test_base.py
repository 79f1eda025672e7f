"""SVDLLMModifier through llmcompressor's real oneshot on a tiny GQA Llama."""

import pytest
import torch
from support import RECIPE_SVD, run_oneshot

from svdllm_plugin import SVDLinear, SVDLLMModifier
from svdllm_plugin.checkpoint import load_pretrained, save_pretrained
from svdllm_plugin.layers import factorized_ranks


def test_yaml_recipe_factorizes_every_decoder_linear(tiny, calib):
    dense = {n: m.weight.detach().clone() for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear)}
    run_oneshot(tiny, calib, RECIPE_SVD.format(ratio=0.4))
    ranks = factorized_ranks(tiny)
    assert len(ranks) == 2 * 7  # q k v o gate up down, 2 layers
    assert "lm_head" not in ranks and not any(isinstance(m, SVDLinear) and m.pending for m in tiny.modules())
    q = tiny.model.layers[0].self_attn.q_proj
    assert q.rank == 64 * 64 * 6 // 10 // 128  # floor(m n (1 - r) / (m + n))
    assert q.svd_u.weight.shape == (64, q.rank) and q.svd_v.weight.shape == (q.rank, 64)
    k = tiny.model.layers[0].self_attn.k_proj  # GQA: 32 x 64
    assert k.out_features == 32
    rel = (k.dense() - dense["model.layers.0.self_attn.k_proj"]).norm() / dense[
        "model.layers.0.self_attn.k_proj"
    ].norm()
    assert 0 < rel < 1


def test_saved_folder_reloads_with_identical_logits(tiny, calib, tmp_path):
    run_oneshot(tiny, calib, RECIPE_SVD.format(ratio=0.3))
    ids = torch.tensor(calib[:2]["input_ids"])
    with torch.no_grad():
        ref = tiny(ids).logits
    save_pretrained(tiny, tmp_path / "out")
    again = load_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)
    assert factorized_ranks(again) == factorized_ranks(tiny)


def test_partially_factorized_model_reloads(tiny, calib, tmp_path):
    recipe = SVDLLMModifier(ratio=0.3, targets=["re:.*mlp\\.(up|down)_proj$"])
    run_oneshot(tiny, calib, recipe)
    assert set(factorized_ranks(tiny)) == {
        f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("up", "down")
    }
    ids = torch.tensor(calib[:1]["input_ids"])
    with torch.no_grad():
        ref = tiny(ids).logits
    save_pretrained(tiny, tmp_path / "partial")
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "partial")(ids).logits, ref)


@pytest.mark.parametrize("activations", ["original", "propagated"])
@pytest.mark.parametrize("method", ["svd_llm", "svd_llm_v2"])
def test_activation_sources_and_methods_run(tiny, calib, activations, method):
    shapes = {
        n: m.weight.shape
        for n, m in tiny.model.layers.named_modules(prefix="model.layers")
        if isinstance(m, torch.nn.Linear)
    }
    run_oneshot(tiny, calib, SVDLLMModifier(ratio=0.3, activations=activations, method=method))
    assert factorized_ranks(tiny) == {n: m * n_ * 7 // 10 // (m + n_) for n, (m, n_) in shapes.items()}


def test_rank_multiple_and_overrides(tiny, calib):
    recipe = SVDLLMModifier(ratio=0.2, rank_multiple=8, overrides={"re:.*down_proj$": 0.6})
    run_oneshot(tiny, calib, recipe)
    ranks = factorized_ranks(tiny)
    assert all(k % 8 == 0 for k in ranks.values())
    assert ranks["model.layers.0.mlp.down_proj"] < ranks["model.layers.0.mlp.up_proj"]


def test_matrix_that_saves_nothing_stays_dense(tiny, calib):
    # rank_multiple 32 rounds k_proj's (32 x 64) rank up to 32, which saves nothing
    run_oneshot(tiny, calib, SVDLLMModifier(ratio=0.05, rank_multiple=32))
    assert type(tiny.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert isinstance(tiny.model.layers[0].mlp.gate_proj, SVDLinear)


def test_shared_inputs_are_accumulated_once(tiny, calib):
    modifier = SVDLLMModifier(ratio=0.3)
    run_oneshot(tiny, calib, modifier)
    records = {r["name"].split(".", 3)[-1]: r for r in modifier.records if ".layers.0." in r["name"]}
    assert records["self_attn.q_proj"]["tokens"] == records["self_attn.k_proj"]["tokens"] == len(calib) * 32


def test_model_dump_round_trip():
    modifier = SVDLLMModifier(ratio=0.3, whitening="eigh", overrides={"re:.*q_proj": 0.5})
    assert SVDLLMModifier.model_validate(modifier.model_dump()) == modifier


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"ratio": 1.0}, "must be in \\(0, 1\\)"),
        ({"ratio": 0}, "must be in \\(0, 1\\)"),
        ({"ratio": -0.5}, "must be in \\(0, 1\\)"),
        ({"whitening": "qr"}, "cholesky"),
        ({"method": "magic"}, "svd_llm"),
        ({"rank_multiple": 0}, "positive integer"),
        ({"overrides": {"q_proj": 2.0}}, "overrides"),
        ({"ratoi": 0.2}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        SVDLLMModifier(**settings)


def test_targets_matching_nothing_is_an_error(tiny, calib):
    with pytest.raises(ValueError, match="no Linear modules matching"):
        run_oneshot(tiny, calib, SVDLLMModifier(targets=["re:.*nonexistent$"]))


def test_non_finite_activations_are_an_error(tiny, calib):
    with torch.no_grad():
        tiny.model.layers[0].input_layernorm.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite activations"):
        run_oneshot(tiny, calib, SVDLLMModifier(ratio=0.3))
