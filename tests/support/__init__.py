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


def svd_recipe(folder: Path, **settings) -> str:
    """The path of a recipe file written into ``folder``: one SVDLLMModifier with ``settings``
    (ratio 0.3 unless given)."""
    lines = "".join(f"      {k}: {v}\n" for k, v in {"ratio": 0.3, **settings}.items())
    path = folder / "recipe.yaml"
    path.write_text(f"svd_stage:\n  svd_modifiers:\n    SVDLLMModifier:\n{lines}")
    return str(path)


def run_oneshot(model, calib, recipe, **kwargs):
    """llmcompressor's oneshot over all of ``calib`` at its own sequence length (``kwargs``: more of
    oneshot's arguments, e.g. ``pipeline``)."""
    from llmcompressor import oneshot

    import svdllm_plugin  # noqa: F401

    oneshot(
        model=model,
        dataset=calib,
        recipe=recipe,
        num_calibration_samples=len(calib),
        max_seq_length=len(calib[0]["input_ids"]),
        **kwargs,
    )
    return model
