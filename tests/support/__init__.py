"""Test-only helpers shared by the test folders (importable as ``support``: pyproject's
``[tool.pytest.ini_options] pythonpath`` puts tests/ on sys.path). Fixtures live in conftest.py."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root (recipes/, benchmarks/, svdllm_plugin/)

RECIPE_SVD = """
svd_stage:
  svd_modifiers:
    SVDLLMModifier:
      ratio: {ratio}
"""


def run_oneshot(model, calib, recipe):
    """llmcompressor's oneshot over all of ``calib`` at its own sequence length."""
    from llmcompressor import oneshot

    import svdllm_plugin  # noqa: F401

    oneshot(
        model=model,
        dataset=calib,
        recipe=recipe,
        num_calibration_samples=len(calib),
        max_seq_length=len(calib[0]["input_ids"]),
    )
    return model
