"""Every code block of README.md and docs/*.md runs: the Python ones on a tiny model, the YAML ones
as recipes, and every `svdllm` line of the bash ones through the CLI's argument parser (not executed)."""

from __future__ import annotations

import re
import shlex
import shutil

import pytest
import torch
from support import REPO

from svdllm_plugin.cli import build_parser

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEXT = {page.relative_to(REPO).as_posix(): page.read_text() for page in PAGES}


def blocks(language: str) -> list[str]:
    pattern = rf"^```{language}\n(.*?)^```"
    return [code for text in TEXT.values() for code in re.findall(pattern, text, flags=re.S | re.M)]


PYTHON, YAML, BASH = blocks("python"), blocks("yaml"), blocks("bash")
COMMANDS = [
    line.strip() for block in BASH for line in block.splitlines() if line.strip().startswith("svdllm ")
]
# synopsis placeholders -> a value of the right kind
EXAMPLES = {"N": "4", "L": "32", "W": "4"}


def test_readme_has_blocks_of_each_kind():
    assert PYTHON and YAML and len(COMMANDS) >= 4


@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_block_runs(code, tiny, tiny_dir, tiny_factory, tokenizer, calib, tmp_path, monkeypatch):
    """Names the block uses without defining (model, tokenizer, ds) are a tiny model and data;
    it runs in a scratch folder holding a copy of recipes/, so its relative paths resolve."""
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    if "outputs/smollm2-svdllm-0.2" in code:  # what `make run` writes; a tiny stand-in here
        from support.factors import factorize_ratio

        from svdllm_plugin.checkpoint import save_pretrained

        folder = tmp_path / "outputs" / "smollm2-svdllm-0.2"
        save_pretrained(factorize_ratio(tiny_factory()), folder, tokenizer)
    namespace = {"model": tiny, "tokenizer": tokenizer, "ds": calib, "path": str(tiny_dir)}
    exec(compile(code, "README.md or docs", "exec"), namespace)
    if "save_pretrained" in code:  # the folder holds the model the block compressed
        from svdllm_plugin.checkpoint import load_pretrained
        from svdllm_plugin.layers import factorized_ranks

        saved, model = load_pretrained(tmp_path / "out"), namespace["model"]
        assert factorized_ranks(saved) == factorized_ranks(model) and factorized_ranks(saved)
        ids = torch.tensor(calib[:1]["input_ids"])
        with torch.no_grad():
            torch.testing.assert_close(saved(ids).logits, model(ids).logits)


@pytest.mark.parametrize("text", YAML, ids=[f"yaml-{i}" for i in range(len(YAML))])
def test_yaml_block_is_a_valid_recipe(text, tmp_path):
    from svdllm_plugin.compress import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    _, modifiers = load_recipe(str(path))  # pydantic validates every modifier's settings
    assert modifiers


def _example(token: str) -> str:
    token = token.strip("[]")
    return EXAMPLES.get(token, token.split("|")[0])


@pytest.mark.parametrize("line", COMMANDS, ids=[c.split()[1] + f"-{i}" for i, c in enumerate(COMMANDS)])
def test_bash_svdllm_line_parses(line):
    argv = [_example(t) for t in shlex.split(line)[1:] if t.strip("[]")]
    args = build_parser().parse_args(argv)
    assert args.command == argv[0]


def test_readme_is_short_and_links_resolve():
    """README stays an entry page; every relative link of README and docs points to a file."""
    assert len(TEXT["README.md"].splitlines()) <= 300
    for name, text in TEXT.items():
        base = (REPO / name).parent
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (base / target).exists(), f"{name} links to missing {target}"
