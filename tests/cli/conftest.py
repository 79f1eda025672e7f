"""Compressed folders shared by the command tests: `svd_dir` (the default recipe; the error
tables) and two written by `svdllm compress` with the recipes themselves, a float SVD-LLM
checkpoint (recipes/svd_llm_0.2.yaml) and a GPTQ W4 factor checkpoint (recipes/svd_w4.yaml), both
on the hidden-256 tiny Llama with the SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import REPO
from support.cli_errors import FAST

from svdllm_plugin.cli import main

RECIPES = REPO / "recipes"


def _compressed(recipe_stem, tmp_path_factory, save_tiny) -> Path:
    work = tmp_path_factory.mktemp(recipe_stem)
    dense = save_tiny(work / "dense", hidden=256, max_position_embeddings=128)
    out = work / "checkpoint"
    recipe = RECIPES / f"{recipe_stem}.yaml"
    argv = ["compress", "--model", str(dense), "--recipe", str(recipe), "--output", str(out)]
    assert main([*argv, "--num-samples", "8", "--seq-len", "32", "--eval-windows", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def svd_folder(tmp_path_factory, save_tiny):
    return _compressed("svd_llm_0.2", tmp_path_factory, save_tiny)


@pytest.fixture(scope="session")
def w4_folder(tmp_path_factory, save_tiny):
    return _compressed("svd_w4", tmp_path_factory, save_tiny)


@pytest.fixture(scope="session")
def svd_dir(tiny_dir, tmp_path_factory) -> Path:
    """A compressed tiny model, written by the CLI."""
    out = tmp_path_factory.mktemp("svd") / "svd"
    assert main(["compress", "--model", str(tiny_dir), "--output", str(out), *FAST]) == 0
    return out
