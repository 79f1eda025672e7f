"""Every YAML in recipes/ through llmcompressor's oneshot on a tiny Llama, and the checks that make
recipes composable: OneshotMagnitudePruningModifier's place in a recipe (its own tests:
tests/modifiers/pruning/test_magnitude.py), and SVDLLMModifier's early group-size check.

The tiny Llama (hidden 256, intermediate 512, 2 layers, 4 heads / 2 KV heads, tied embeddings,
the SmolLM2 tokenizer's vocabulary) is the smallest shape where the recipes' SmolLM2 settings
(SVD ratio 0.4 with rank_multiple 64, GPTQ group 64) still save parameters: every factor rank is 64.
One oneshot per recipe (a module-scoped fixture), saved with ``checkpoint.save_pretrained`` and
reloaded with ``checkpoint.load_pretrained``; the tests then read the integers, zeros and logits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from support import REPO, run_oneshot
from torch import nn

from svdllm_plugin.layers import SVDLinear, factorized_ranks

RECIPES = sorted(  # recipes with compensation (GPTQ groups of 192) run in test_compensation.py
    p for p in (REPO / "recipes").glob("*.yaml") if "LowRankCompensationModifier" not in p.read_text()
)
LORA_FAST = dict(steps=2, batch_size=2, num_samples=4, seq_len=32, eval_windows=0)
PRUNING = ("SparseGPTModifier", "WandaPruningModifier", "OneshotMagnitudePruningModifier")


# ---------------------------------------------------------------- helpers


def recipe_modifiers(recipe: dict) -> dict[str, dict]:
    """{modifier name: settings} of a ``*_stage`` / ``*_modifiers`` recipe, in order."""
    return {
        name: settings or {}
        for stage in recipe.values()
        for group in stage.values()
        for name, settings in group.items()
    }


def fast_recipe(path: Path, folder: Path) -> str:
    """The recipe text, with LoRA shortened to a few steps on short windows."""
    recipe = yaml.safe_load(path.read_text())
    for stage in recipe.values():
        for group in stage.values():
            if "SequentialLoRAModifier" in group:
                group["SequentialLoRAModifier"].update(LORA_FAST)
    out = folder / path.name
    out.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(out)


def compress_tiny(dense: Path, recipe: str, calib):
    """The tiny model from ``dense`` after oneshot with ``recipe`` (a path or YAML text)."""
    from transformers import AutoModelForCausalLM

    import svdllm_plugin  # noqa: F401  (registers the modifiers)
    from svdllm_plugin.compress import load_recipe
    from svdllm_plugin.recipe_checks import check_against_model, check_applied, model_snapshot

    model = AutoModelForCausalLM.from_pretrained(dense)
    checked = (
        "\n" not in recipe and Path(recipe).is_file()
    )  # a recipe file: the CLI's checks (issue 22) pass on it too
    if checked:
        _, modifiers = load_recipe(recipe)
        check_against_model(modifiers, model)
        before = model_snapshot(model)
    run_oneshot(model, calib, recipe)
    if checked:
        check_applied(modifiers, model, before)
    return model.eval()


def factor_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: weight} of every svd_u / svd_v child."""
    return {
        f"{name}.{child}": getattr(layer, child).weight.detach()
        for name, layer in model.named_modules()
        if isinstance(layer, SVDLinear)
        for child in ("svd_u", "svd_v")
    }


# ---------------------------------------------------------------- one oneshot per recipe


@dataclass
class Compressed:
    name: str
    modifiers: dict[str, dict]
    model: nn.Module  # in memory, right after oneshot
    logits: torch.Tensor  # of ``model`` on the probe, before saving
    folder: Path  # checkpoint.save_pretrained
    reloaded: nn.Module  # checkpoint.load_pretrained
    embed: torch.Tensor  # the dense model's embedding table


@pytest.fixture(scope="module")
def dense(tmp_path_factory, save_tiny) -> Path:
    return save_tiny(tmp_path_factory.mktemp("recipes") / "tiny", hidden=256, max_position_embeddings=128)


@pytest.fixture(scope="module")
def probe(tokenizer) -> torch.Tensor:
    return torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(3))


def _with(*names: str) -> list[Path]:
    """The recipes that hold one of the modifiers ``names``."""
    return [p for p in RECIPES if set(names) & set(recipe_modifiers(yaml.safe_load(p.read_text())))]


def over(recipes: list[Path]):
    """Parametrize a test over ``recipes`` (the module-scoped ``compressed`` fixture runs each once)."""
    return pytest.mark.parametrize("compressed", recipes, indirect=True, ids=[p.stem for p in recipes])


@pytest.fixture(scope="module")
def compressed(request, dense, calib, probe, tokenizer, tmp_path_factory) -> Compressed:
    from transformers import AutoModelForCausalLM

    from svdllm_plugin.checkpoint import load_pretrained, save_pretrained

    path, work = request.param, tmp_path_factory.mktemp(request.param.stem)
    embed = AutoModelForCausalLM.from_pretrained(dense).model.embed_tokens.weight.detach().clone()
    model = compress_tiny(dense, fast_recipe(path, work), calib)
    with torch.no_grad():
        logits = model(probe).logits
    folder = save_pretrained(model, work / "checkpoint", tokenizer)
    reloaded = load_pretrained(folder)
    modifiers = recipe_modifiers(yaml.safe_load(path.read_text()))
    return Compressed(path.stem, modifiers, model, logits, folder, reloaded, embed)


@over(RECIPES)
def test_recipe_is_documented(compressed):
    text = (RECIPES[0].parent / f"{compressed.name}.yaml").read_text()
    assert text.startswith("#")
    assert f"svdllm compress --recipe recipes/{compressed.name}.yaml --output outputs/" in text


@over(RECIPES)
def test_factorized_ranks(compressed):
    svd = compressed.modifiers.get("SVDLLMModifier")
    ranks = factorized_ranks(compressed.model)
    assert factorized_ranks(compressed.reloaded) == ranks
    if svd is None:  # the dense GPTQ baseline
        assert not ranks
        return
    assert len(ranks) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    multiple = svd.get("rank_multiple", 1)
    assert all(k % multiple == 0 for k in ranks.values())
    assert not any(layer.pending for layer in compressed.model.modules() if isinstance(layer, SVDLinear))


@over(RECIPES)
def test_reload_gives_identical_logits(compressed, probe):
    with torch.no_grad():
        assert torch.equal(compressed.reloaded(probe).logits, compressed.logits)


@over(RECIPES)
def test_lm_head_and_embeddings_untouched(compressed):
    for model in (compressed.model, compressed.reloaded):
        assert type(model.lm_head) is nn.Linear
        assert getattr(model.lm_head, "quantization_scheme", None) is None
        assert torch.equal(model.model.embed_tokens.weight, compressed.embed)
        assert torch.equal(model.lm_head.weight, compressed.embed)  # tied, unpruned


@over(_with("GPTQModifier"))
def test_quantized_factors_fit_their_bits(compressed):
    from support.factors import max_distinct_per_group

    from svdllm_plugin.export import read_quantized_weights

    gptq = compressed.modifiers["GPTQModifier"]
    weights = gptq["config_groups"]["group_0"]["weights"]
    bits, group_size = weights["num_bits"], weights["group_size"]
    saved = read_quantized_weights(compressed.folder)
    ranks = factorized_ranks(compressed.model)
    expected = (
        {f"{n}.{c}" for n in ranks for c in ("svd_u", "svd_v")}
        if ranks
        else {n for n, m in compressed.model.named_modules() if type(m) is nn.Linear and n != "lm_head"}
    )
    assert saved.keys() == expected
    for name, qw in saved.items():
        assert qw.bits == bits and qw.group_size == group_size, name
        q = qw.q.int()
        assert -(2 ** (bits - 1)) <= q.min() and q.max() < 2 ** (bits - 1)
        assert max_distinct_per_group(qw.q, group_size) <= 2**bits
        weight = compressed.reloaded.get_submodule(name).weight.detach()  # dequantized on reload
        assert max_distinct_per_group(weight, group_size) <= 2**bits
        assert torch.equal(qw.dequantize(), weight)


@over(_with(*PRUNING))
def test_pruned_factors_reach_their_sparsity(compressed):
    pruning = {name: settings for name, settings in compressed.modifiers.items() if name in PRUNING}
    sparsity = max(settings["sparsity"] for settings in pruning.values())
    structure = next(iter(pruning.values())).get("mask_structure", "unstructured")
    weights = factor_weights(compressed.reloaded)
    assert len(weights) == 28
    zeros = sum(int((W == 0).sum()) for W in weights.values())
    measured = zeros / sum(W.numel() for W in weights.values())
    if structure == "2:4":
        for name, W in weights.items():
            groups = (W == 0).reshape(W.shape[0], -1, 4).sum(dim=2)  # (m, n / 4)
            assert bool((groups >= 2).all()), name
    if "GPTQModifier" in compressed.modifiers:
        # GPTQ's 4-bit rounding zeroes small weights too; the final magnitude pass leaves
        # at least half of every row zero
        assert measured >= sparsity
        for name, W in weights.items():
            assert bool(((W == 0).sum(dim=1) >= round(sparsity * W.shape[1])).all()), name
    else:
        assert abs(measured - sparsity) <= 0.01, measured


# ---------------------------------------------------------------- SVDLLMModifier's group-size check


def test_group_size_that_does_not_divide_the_ranks_fails_early(dense, calib):
    recipe = """
svd_stage:
  svd_modifiers:
    SVDLLMModifier:
      ratio: 0.4
      rank_multiple: 1
    GPTQModifier:
      ignore: ["re:.*lm_head"]
      config_groups:
        group_0:
          targets: ["Linear"]
          weights:
            num_bits: 4
            type: int
            symmetric: true
            strategy: group
            group_size: 64
"""
    with pytest.raises(ValueError, match=r"groups of 64 .* SVD rank 76.*`rank_multiple: 64`"):
        compress_tiny(dense, recipe, calib)


# ---------------------------------------------------------------- OneshotMagnitudePruningModifier in a recipe


def test_magnitude_before_svd_in_a_recipe_is_refused(dense, calib):
    recipe = """
prune_stage:
  prune_modifiers:
    OneshotMagnitudePruningModifier:
      sparsity: 0.5
    SVDLLMModifier:
      ratio: 0.4
"""
    with pytest.raises(ValueError, match="put SVDLLMModifier before it"):
        compress_tiny(dense, recipe, calib)


def test_recipes_resolve_our_modifiers():
    """Every recipe parses (pydantic validates each modifier) and names known modifiers."""
    from llmcompressor.recipe import Recipe

    import svdllm_plugin  # noqa: F401

    names = set()
    for path in RECIPES:
        recipe = Recipe.create_instance(path.read_text())
        names |= {type(m).__name__ for m in recipe.modifiers}
    assert {
        "SVDLLMModifier",
        "GPTQModifier",
        "SparseGPTModifier",
        "WandaPruningModifier",
        "OneshotMagnitudePruningModifier",
        "SequentialLoRAModifier",
    } <= names
    assert all(re.fullmatch(r"[a-z0-9_.]+", p.stem) for p in RECIPES)
