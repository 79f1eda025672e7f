"""SequentialLoRAModifier and its training functions, on a tiny Llama whose Linears are SVDLinears."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from llmcompressor.core import Event, EventType, State
from pydantic import ValidationError
from torch import nn

from svdllm_plugin.layers import SVDLinear, replace_module
from svdllm_plugin.models import resolve_model_path
from svdllm_plugin.modifiers.lora import SequentialLoRAModifier
from svdllm_plugin.modifiers.lora.train import LoraSettings, train_round

RANK = 8
SEQ_LEN = 32
TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun. " * 300


@pytest.fixture
def text_file(tmp_path) -> str:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return str(path)


def _factorize(model: nn.Module, rank: int = RANK, activate: bool = True) -> list[str]:
    """Every Linear but lm_head becomes an SVDLinear with plain truncated-SVD factors."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    for name in names:
        linear = model.get_submodule(name)
        layer = SVDLinear.from_linear(linear, rank)
        U, S, Vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
        layer.set_factors(U[:, :rank] * S[:rank].sqrt(), S[:rank].sqrt()[:, None] * Vh[:rank])  # (m,k) (k,n)
        if activate:
            layer.activate()
        replace_module(model, name, layer)
    return names


@pytest.fixture
def model(tiny_factory):
    model = tiny_factory(hidden=32, max_position_embeddings=128)
    _factorize(model)
    return model


def _factor_weights(model: nn.Module, child: str) -> dict[str, torch.Tensor]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}
    return {n: getattr(m, child).weight.detach().clone() for n, m in layers.items()}


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith((".svd_u", ".svd_v"))}


def _windows(tokenizer, n: int) -> torch.Tensor:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: n * SEQ_LEN]).view(n, SEQ_LEN)


def _assert_clean(model: nn.Module, modules_before: dict[str, nn.Module]) -> None:
    assert not [k for k in model.state_dict() if "lora_" in k]
    assert not [type(m).__name__ for m in model.modules() if "lora" in type(m).__module__]
    assert not hasattr(model, "peft_config")
    after = _modules(model)
    assert after.keys() == modules_before.keys()
    assert all(after[n] is m for n, m in modules_before.items())  # same objects: GPTQ's bindings hold
    for layer in (m for m in model.modules() if isinstance(m, SVDLinear)):
        assert layer.rank == RANK and not layer.pending
        assert layer.svd_v.weight.shape == (RANK, layer.in_features)
        assert layer.svd_u.weight.shape == (layer.out_features, RANK)


# ---------------------------------------------------------------- training functions


@pytest.mark.parametrize("factor, trained, frozen", [("u", "svd_u", "svd_v"), ("v", "svd_v", "svd_u")])
def test_round_trains_only_its_factor(model, tokenizer, factor, trained, frozen):
    layers = [n for n, m in model.named_modules() if isinstance(m, SVDLinear)]
    modules = _modules(model)
    before = {c: _factor_weights(model, c) for c in ("svd_u", "svd_v")}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()

    settings = LoraSettings(r=4, alpha=8, dropout=0.0, lr=1e-2, steps=12, batch_size=2)
    result = train_round(model, layers, factor, _windows(tokenizer, 4), settings)

    assert result.modules == len(layers) and len(result.losses) == 12
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    after = {c: _factor_weights(model, c) for c in ("svd_u", "svd_v")}
    assert all(torch.equal(before[frozen][n], after[frozen][n]) for n in layers)
    assert all(not torch.equal(before[trained][n], after[trained][n]) for n in layers)
    _assert_clean(model, modules)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training  # mode restored


def test_round_refuses_pending_layers(tokenizer, tiny_factory):
    model = tiny_factory(hidden=32, max_position_embeddings=128)
    layers = _factorize(model, activate=False)
    with pytest.raises(ValueError, match="SVDLLMModifier has finished"):
        train_round(model, layers, "u", _windows(tokenizer, 2), LoraSettings(steps=1))


# ---------------------------------------------------------------- the modifier


def _run(modifier: SequentialLoRAModifier, model: nn.Module) -> None:
    state = State(model=model)
    modifier.initialize(state)
    for event in (EventType.CALIBRATION_START, EventType.SEQUENTIAL_EPOCH_END, EventType.CALIBRATION_END):
        modifier.update_event(state, Event(type_=event), modules=list(model.modules()))
    modifier.finalize(state)


def _modifier(text_file: str, **kwargs) -> SequentialLoRAModifier:
    settings = dict(
        r=4,
        alpha=8,
        dropout=0.0,
        lr=1e-2,
        steps=8,
        batch_size=2,
        num_samples=8,
        seq_len=SEQ_LEN,
        dataset=text_file,
        tokenizer=resolve_model_path("smollm2-135m"),
        eval_windows=2,
    )
    return SequentialLoRAModifier(**{**settings, **kwargs})


@pytest.mark.parametrize("order", [["u", "v"], ["v", "u"], ["uv"]])
def test_modifier_rounds_lower_held_out_perplexity(model, text_file, order):
    modules = _modules(model)
    modifier = _modifier(text_file, order=order)
    _run(modifier, model)

    records = modifier.records
    assert [r["factor"] for r in records] == order
    for record in records:
        assert record["ppl_after"] < record["ppl_before"]
    _assert_clean(model, modules)


def test_modifier_bfloat16_autocast(model, text_file):
    modifier = _modifier(text_file, order=["u"], dtype="bfloat16", eval_windows=0)
    _run(modifier, model)
    assert modifier.records[0]["ppl_before"] is None
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_round_trip(text_file):
    modifier = _modifier(text_file, order=["v", "u"], steps=None, epochs=2.5)
    again = SequentialLoRAModifier.model_validate(modifier.model_dump())
    assert again == modifier
    assert again.steps_per_round == 10  # ceil(2.5 * 8 / 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "`r` must be a positive integer; got 0"),
        (dict(dtype="float16"), "float16 collapsed the LoRA loss"),
        (dict(dtype="fp16"), "use 'bfloat16' or 'float32'"),
        (dict(order=[]), "`order` needs at least one round"),
        (dict(order=["w"]), "order"),
        (dict(steps=0), "`steps` must be a positive integer"),
        (dict(lr=0), "`lr` must be > 0"),
        (dict(dropout=1.0), r"`dropout` must be in \[0, 1\)"),
        (dict(seq_len=1), r"`seq_len` \(SequentialLoRAModifier\) must be an integer >= 2; got 1"),
        (dict(eval_windows=-1), "`eval_windows` must be >= 0"),
        (dict(rank=8), "Extra inputs are not permitted"),
    ],
)
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        SequentialLoRAModifier(**kwargs)


def test_model_without_svd_layers(tokenizer, tiny_factory, text_file):
    model = tiny_factory(hidden=32, max_position_embeddings=128)
    with pytest.raises(ValueError, match="put SVDLLMModifier before it in the recipe"):
        _modifier(text_file).initialize(State(model=model))


def test_targets_matching_nothing(model, text_file):
    with pytest.raises(ValueError, match="no SVDLinear layers matching.*check `targets`"):
        _modifier(text_file, targets=["re:.*no_such_layer$"]).initialize(State(model=model))


def test_targets_pick_layers(model, text_file):
    before = _factor_weights(model, "svd_u")
    modifier = _modifier(text_file, order=["u"], targets=["re:.*self_attn.*"], eval_windows=0)
    _run(modifier, model)
    after = _factor_weights(model, "svd_u")
    assert modifier.records[0]["modules"] == 8  # q, k, v, o in 2 layers
    assert all(torch.equal(before[n], after[n]) != ("self_attn" in n) for n in before)


# ---------------------------------------------------------------- through llmcompressor


RECIPE = """
lora_stage:
  lora_modifiers:
    SVDLLMModifier:
      ratio: 0.6
    SequentialLoRAModifier:
      order: [u, v]
      r: 4
      alpha: 8
      dropout: 0.0
      lr: 0.01
      steps: 6
      batch_size: 2
      num_samples: 8
      seq_len: 32
      dataset: {dataset}
      eval_windows: 2
    GPTQModifier:
      ignore: ["re:.*lm_head"]
      config_groups:
        group_0:
          targets: [Linear]
          weights:
            num_bits: 8
            type: int
            symmetric: true
            strategy: channel
"""


def _oneshot(tokenizer, tiny_factory, text_file: str, folder: Path, **kwargs) -> nn.Module:
    from llmcompressor import oneshot

    from svdllm_plugin.data import calibration_dataset

    model = tiny_factory(hidden=32, max_position_embeddings=128)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.config.name_or_path = str(folder)  # oneshot and the modifier's tokenizer read it
    calibration = calibration_dataset(tokenizer, TEXT, num_samples=4, seq_len=SEQ_LEN)
    oneshot(
        model=model,
        recipe=RECIPE.format(dataset=text_file),
        dataset=calibration,
        num_calibration_samples=4,
        max_seq_length=SEQ_LEN,
        **kwargs,
    )
    return model


def test_oneshot_yaml_recipe(tokenizer, tiny_factory, text_file, tmp_path):
    """SVD-LLM, then LoRA on its factors, then GPTQ on the merged factors, from one YAML recipe."""
    from llmcompressor import active_session

    cwd_before = sorted(os.listdir())
    model = _oneshot(tokenizer, tiny_factory, text_file, tmp_path / "tiny")

    modifiers = active_session().lifecycle.recipe.modifiers
    lora = next(m for m in modifiers if isinstance(m, SequentialLoRAModifier))
    assert [r["factor"] for r in lora.records] == ["u", "v"]
    assert lora.records[-1]["ppl_after"] < lora.records[0]["ppl_before"]
    layers = [m for m in model.modules() if isinstance(m, SVDLinear)]
    assert len(layers) == 14 and not any(layer.pending for layer in layers)
    assert not [k for k in model.state_dict() if "lora_" in k]
    for layer in layers:  # GPTQ ran after LoRA: the merged factors lie on its 8-bit grid
        for factor in (layer.svd_u, layer.svd_v):
            q = factor.weight / factor.weight_scale  # (rows, cols) / (rows, 1)
            assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 128
    assert sorted(os.listdir()) == cwd_before


def test_oneshot_shared_pipeline_is_refused(tokenizer, tiny_factory, text_file, tmp_path):
    with pytest.raises(ValueError, match="pipeline='independent'"):
        _oneshot(tokenizer, tiny_factory, text_file, tmp_path / "tiny", pipeline="sequential")
