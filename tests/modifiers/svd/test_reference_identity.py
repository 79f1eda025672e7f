"""SVDLLMModifier through oneshot equals the plain-torch SVD-LLM re-implementation.

With activations="original" both whiten with H from the dense model's activations on the
same windows, so the compressed models must compute the same logits. The reference lives
in benchmarks/reference_svdllm.py (one copy), loaded here by path.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from support import REPO
from transformers import LlamaForCausalLM

from svdllm_plugin.layers import SVDLinear

# llmcompressor needs the `*_stage:` / `*_modifiers:` nesting; a bare `SVDLLMModifier: {...}`
# parses to a recipe with no modifiers and oneshot silently does nothing
RECIPE = """
svd_stage:
  svd_modifiers:
    SVDLLMModifier:
      ratio: {ratio}
      activations: original
"""
RATIO = 0.2
REFERENCE = REPO / "benchmarks" / "reference_svdllm.py"


def load_reference():
    spec = importlib.util.spec_from_file_location("reference_svdllm", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_folder(tmp_path, save_tiny) -> Path:
    """Hidden 32, 2 layers, 4 heads / 2 KV heads, saved with the SmolLM2 tokenizer."""
    return save_tiny(tmp_path, hidden=32, max_position_embeddings=64, tie_word_embeddings=False)


def test_plugin_matches_reference(tiny_folder, tokenizer, calib):
    from llmcompressor import oneshot

    import svdllm_plugin  # noqa: F401

    reference = load_reference()
    plugin = LlamaForCausalLM.from_pretrained(tiny_folder)
    ref = copy.deepcopy(plugin)
    samples = torch.tensor(calib["input_ids"])  # (N, L): the windows oneshot gets

    oneshot(
        model=plugin,
        processor=tokenizer,
        dataset=calib,
        recipe=RECIPE.format(ratio=RATIO),
        num_calibration_samples=len(calib),
        max_seq_length=samples.shape[1],
    )
    reference.reference_svdllm(ref, samples, RATIO)

    ours = {n: m for n, m in plugin.named_modules() if isinstance(m, SVDLinear)}
    theirs = {n: m for n, m in ref.named_modules() if isinstance(m, torch.nn.Sequential)}
    assert sorted(ours) == sorted(theirs) and len(ours) == 14  # 7 Linears x 2 layers
    for name, layer in ours.items():
        W_ref = reference.reference_product(theirs[name])
        assert layer.rank == theirs[name][0].out_features, name
        rel = ((layer.dense().double() - W_ref).norm() / W_ref.norm()).item()
        assert rel < 1e-4, f"{name}: W_u W_v differs from the reference by {rel:.2e}"

    with torch.no_grad():
        x = samples[:4]
        logits_ours, logits_ref = plugin(input_ids=x).logits, ref(input_ids=x).logits
    torch.testing.assert_close(logits_ours, logits_ref, rtol=1e-4, atol=1e-4)
