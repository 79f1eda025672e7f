"""LowRankCompensationModifier on a tiny Llama (hidden 128, 2 layers, GPTQ W2 group 64).

One oneshot per variant (module-scoped): float factors in the sequential pipeline (the CLI's
choice), 4-bit factors with two alternating rounds in oneshot's default independent pipeline.
The tests recompute the whitened objective from the calibration inputs themselves, count the
factors' bits, save and reload through the plugin and through stock transformers in a process
that cannot import svdllm_plugin, and check the one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from support import REPO
from support.processes import run_without_plugin
from torch import nn

from svdllm_plugin.checkpoint import load_pretrained, read_safetensors, save_pretrained
from svdllm_plugin.layers import CompensatedLinear, compensated_ranks

GPTQ_W2 = {
    "ignore": ["re:.*lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 2,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 64,
            },
        }
    },
}
VARIANTS = {
    "float": (dict(extra_bits=1.0), "sequential"),
    "int4": (dict(extra_bits=1.0, factor_bits=4, rounds=2, budget_dtype_bits=32), "independent"),
}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def recipe(compensation: dict | None, first: str = "GPTQModifier") -> dict:
    modifiers = {"GPTQModifier": GPTQ_W2}
    if compensation is not None:
        modifiers["LowRankCompensationModifier"] = compensation
        if first != "GPTQModifier":
            modifiers = dict(reversed(list(modifiers.items())))
    return {"quant_stage": {"quant_modifiers": modifiers}}


def oneshot_tiny(folder: Path, calib, text: dict, pipeline: str = "independent") -> nn.Module:
    import yaml
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    import svdllm_plugin  # noqa: F401  (registers the modifiers)

    model = AutoModelForCausalLM.from_pretrained(folder)
    oneshot(
        model=model,
        dataset=calib,
        recipe=yaml.safe_dump(text, sort_keys=False),
        num_calibration_samples=len(calib),
        max_seq_length=len(calib[0]["input_ids"]),
        pipeline=pipeline,
    )
    return model.eval()


@pytest.fixture(scope="module")
def dense(tmp_path_factory, save_tiny) -> Path:
    return save_tiny(tmp_path_factory.mktemp("compensation") / "tiny", hidden=128)


@pytest.fixture(scope="module")
def original(dense) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense)
    return {n: m.weight.detach().double() for n, m in model.named_modules() if n.endswith(PROJ)}


@pytest.fixture(scope="module")
def compensated(request, dense, calib) -> nn.Module:
    settings, pipeline = VARIANTS[request.param]
    return oneshot_tiny(dense, calib, recipe(settings), pipeline)


@pytest.fixture(scope="module")
def gptq_only(dense, calib) -> nn.Module:
    return oneshot_tiny(dense, calib, recipe(None))


def over_variants():
    return pytest.mark.parametrize("compensated", list(VARIANTS), indirect=True)


def inputs_of(model: nn.Module, calib) -> dict[str, torch.Tensor]:
    """{Linear name: H = X X^T (n, n) float64} over the calibration samples, from this model."""
    H, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith(PROJ):
            target = module.base if isinstance(module, CompensatedLinear) else module

            def hook(_, args, name=name):
                X = args[0].reshape(-1, args[0].shape[-1]).double()
                H[name] = H.get(name, 0) + X.T @ X

            handles.append(target.register_forward_pre_hook(hook))
    with torch.no_grad():
        for sample in calib:
            model(torch.tensor([sample["input_ids"]]))
    for handle in handles:
        handle.remove()
    return H


def error_terms(model: nn.Module, name: str, W: torch.Tensor):
    """(E = W - Q (m, n), L R (m, n) or zeros) of one targeted Linear of ``model``."""
    module = model.get_submodule(name)
    if isinstance(module, CompensatedLinear):
        Q = module.base.weight.detach().double()
        LR = module.lowrank_l.weight.detach().double() @ module.lowrank_r.weight.detach().double()
    else:
        Q, LR = module.weight.detach().double(), torch.zeros_like(W)
    return W - Q, LR


# ---------------------------------------------------------------- the objective


@over_variants()
def test_compensation_never_increases_the_whitened_objective(compensated, original, calib):
    H = inputs_of(compensated, calib)
    before = after = 0.0
    for name, W in original.items():
        E, LR = error_terms(compensated, name, W)
        q_alone = float(((E @ H[name]) * E).sum())  # ||(W - Q) X||^2
        D = E - LR
        with_lr = float(((D @ H[name]) * D).sum())  # ||(W - Q - L R) X||^2
        assert with_lr <= q_alone * (1 + 1e-9), name
        before, after = before + q_alone, after + with_lr
    assert after < 0.9 * before
    assert len(compensated_ranks(compensated)) >= 4


@pytest.mark.parametrize("compensated", ["float"], indirect=True)
def test_compensated_model_is_closer_to_dense_than_gptq_alone(compensated, gptq_only, dense, calib):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(dense).eval()
    ids = torch.tensor([s["input_ids"] for s in calib])
    with torch.no_grad():
        target = reference(ids).logits
        gap = {
            k: float((m(ids).logits - target).pow(2).mean())
            for k, m in (("q", gptq_only), ("lr", compensated))
        }
    assert gap["lr"] < gap["q"]


# ---------------------------------------------------------------- the budget


@over_variants()
def test_rank_budget_is_respected(compensated, request, tmp_path):
    settings, _ = VARIANTS[request.node.callspec.params["compensated"]]
    budget = settings["extra_bits"]
    for layer in compensated.model.layers:
        modules = [m for n, m in layer.named_modules() if n.endswith(PROJ)]
        weights = sum(m.in_features * m.out_features for m in modules)
        float_bits = sum(
            m.rank * (m.in_features + m.out_features) * 16
            for m in modules
            if isinstance(m, CompensatedLinear)
        )
        if settings.get("factor_bits") is None:
            assert 0 < float_bits <= budget * weights
    if settings.get("factor_bits") is None:
        return
    # quantized factors: the bytes actually saved (packed integers and scales)
    folder = save_pretrained(compensated, tmp_path / "saved")
    state = read_safetensors(folder)
    factor_bytes = sum(
        t.numel() * t.element_size()
        for k, t in state.items()
        if ".lowrank_" in k and k.rpartition(".")[2] in ("weight_packed", "weight_scale")
    )
    weights = sum(m.in_features * m.out_features for n, m in compensated.named_modules() if n.endswith(PROJ))
    assert 0 < 8 * factor_bytes <= budget * weights
    assert not any(k.endswith(".lowrank_l.weight") for k in state)  # packed, not float


# ---------------------------------------------------------------- checkpoints

STOCK_SCRIPT = r"""
import json, sys
import torch
try:
    import svdllm_plugin  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
from transformers import AutoModelForCausalLM

work = sys.argv[1]
probe = torch.load(f"{work}/probe.pt")
out = {"blocked": blocked}
for name in sys.argv[2:]:
    folder = f"{work}/{name}"
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        torch.save(model(probe).logits, f"{work}/{name}-stock.pt")
    out[name] = sorted(n for n, _ in model.model.layers[0].self_attn.q_proj.named_children())
print("\nRESULT " + json.dumps(out))
"""


@over_variants()
def test_saved_checkpoint_reloads_with_identical_logits(compensated, request, tmp_path, tokenizer):
    name = request.node.callspec.params["compensated"]
    probe = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = compensated(probe).logits
    save_pretrained(compensated, tmp_path / name, tokenizer)
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["svdllm"]["compensation"] == compensated_ranks(compensated)
    assert config["svdllm"]["format"] == "packed"
    plugin = load_pretrained(tmp_path / name)
    assert compensated_ranks(plugin) == compensated_ranks(compensated)
    with torch.no_grad():
        reloaded = plugin(probe).logits
    assert torch.equal(reloaded, expected)

    torch.save(probe, tmp_path / "probe.pt")
    stock = run_without_plugin(STOCK_SCRIPT, tmp_path, tmp_path, name)
    assert stock["blocked"]
    if "model.layers.0.self_attn.q_proj" in compensated_ranks(compensated):
        assert stock[name] == ["base", "lowrank_l", "lowrank_r"]
    assert torch.equal(torch.load(tmp_path / f"{name}-stock.pt"), reloaded)


# ---------------------------------------------------------------- settings and errors


@pytest.mark.parametrize(
    "settings, field",
    [
        (dict(rank=8, extra_bits=0.5), "got both"),
        (dict(), "got neither"),
        (dict(rank=0), "`rank`"),
        (dict(extra_bits=-0.5), "`extra_bits`"),
        (dict(rank=8, factor_bits=3), "`factor_bits`"),
        (dict(rank=8, rounds=0), "`rounds`"),
        (dict(rank=8, rank_multiple=0), "`rank_multiple`"),
        (dict(rank=8, typo=1), "typo"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, field):
    from svdllm_plugin.modifiers.compensation import LowRankCompensationModifier

    with pytest.raises(ValidationError) as error:
        LowRankCompensationModifier(**settings)
    messages = [e["msg"] for e in error.value.errors()]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert field in messages[0] or field in str(error.value)


def test_settings_round_trip():
    from svdllm_plugin.modifiers.compensation import LowRankCompensationModifier

    modifier = LowRankCompensationModifier(extra_bits=0.5, factor_bits=4, rounds=2, targets="Linear")
    assert LowRankCompensationModifier.model_validate(modifier.model_dump()) == modifier
    assert modifier.targets == ["Linear"]


@pytest.mark.parametrize(
    "compensation, first, message",
    [
        (dict(rank=8, targets=["re:.*no_such_module$"]), "GPTQModifier", "found no Linear modules matching"),
        (dict(rank=8), "LowRankCompensationModifier", "place it AFTER a quantization modifier"),
    ],
)
def test_bad_recipes_fail_before_calibration(dense, calib, compensation, first, message):
    with pytest.raises(ValueError, match=message) as error:
        oneshot_tiny(dense, calib, recipe(compensation, first=first))
    assert "\n" not in str(error.value).strip()


# ---------------------------------------------------------------- the stack recipes

STACKS = sorted(
    p for p in (REPO / "recipes").glob("*.yaml") if "LowRankCompensationModifier:" in p.read_text()
)


@pytest.mark.parametrize("path", STACKS, ids=[p.stem for p in STACKS])
def test_stack_recipe_runs_and_reloads(path, tmp_path, save_tiny, calib, tokenizer):
    """hidden 192, intermediate 384: groups of 64 and of 192 divide every input width."""
    text = path.read_text()
    assert text.startswith("#") and f"svdllm compress --recipe recipes/{path.name}" in text
    folder = save_tiny(tmp_path / "tiny", hidden=192, intermediate_size=384)
    import yaml

    from svdllm_plugin.compress import pipeline_for

    model = oneshot_tiny(folder, calib, yaml.safe_load(text), pipeline="sequential")
    assert compensated_ranks(model)
    probe = torch.randint(0, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(probe).logits
    reloaded = load_pretrained(save_pretrained(model, tmp_path / "saved", tokenizer))
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, expected)
    from llmcompressor.recipe import Recipe

    assert pipeline_for(Recipe.create_instance(text).modifiers) == "sequential"


# ---------------------------------------------------------------- offloading


@pytest.mark.parametrize("compensated", ["float"], indirect=True)
def test_disk_offloaded_model_gets_the_same_factors(compensated, dense, calib, tokenizer, tmp_path):
    """Decoder layers on disk (compressed-tensors offloading): the factors are offloaded like the
    Linear they compensate, the saved checkpoint holds what the offloaded run computed, and the
    first layer (same inputs in both runs) equals the in-memory run's. Later layers see inputs
    propagated through offloaded copies, equal only to rounding, so their factors are not compared.
    """
    import yaml
    from llmcompressor import oneshot
    from test_offload import load_disk_offloaded

    model = load_disk_offloaded(dense, tmp_path / "offload")
    oneshot(
        model=model,
        dataset=calib,
        recipe=yaml.safe_dump(recipe(VARIANTS["float"][0]), sort_keys=False),
        num_calibration_samples=len(calib),
        max_seq_length=len(calib[0]["input_ids"]),
        pipeline="sequential",
    )
    layers = [m for m in model.modules() if isinstance(m, CompensatedLinear)]
    assert layers and {type(m.lowrank_l._parameters).__name__ for m in layers} == {"DiskCache"}
    computed = {
        f"{name}.{child}": model.get_submodule(f"{name}.{child}").weight.detach().clone()
        for name in compensated_ranks(model)
        for child in ("base", "lowrank_l", "lowrank_r")
    }
    reloaded = load_pretrained(save_pretrained(model, tmp_path / "saved", tokenizer))
    assert compensated_ranks(reloaded) == compensated_ranks(model)
    with torch.no_grad():  # a save compresses the Linears in place; the next forward decompresses
        compensated(torch.tensor([calib[0]["input_ids"]]))
    for key, W in computed.items():
        torch.testing.assert_close(reloaded.get_submodule(key).weight.detach(), W, rtol=0, atol=0)
        if key.startswith("model.layers.0."):
            torch.testing.assert_close(
                compensated.get_submodule(key).weight.detach(), W, rtol=1e-5, atol=1e-6
            )
