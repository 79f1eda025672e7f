"""Every bad output folder, recipe and dataset given to `svdllm compress`: exit 2 and one error line
that names the file and the fix, nothing left behind (the contract: tests/support/cli_errors.py;
bad models, the other commands and bad arguments: test_contract.py)."""

from __future__ import annotations

import pytest
from support.cli_errors import (
    RECIPE,
    W4,
    Case,
    D,
    R,
    check_bad_input,
    compress,
    recipe,
)

# placeholders: {tiny} dense tiny Llama folder, {svd} a compressed one, {tmp} the row's tmp_path,
# {out} = {tmp}/out (must not exist afterwards), {model} = {tmp}/model (made by ``edit``)
CASES = [
    # output
    Case(
        "output-exists",
        compress(output="{tmp}/kept"),
        "already exists; choose a new --output or pass --overwrite",
        {"kept/keep.txt": "precious"},
    ),
    Case(
        "output-parent-is-a-file",
        compress(output="{tmp}/file.txt/out"),
        "file.txt is a file, not a folder; choose another --output",
        {"file.txt": "x"},
    ),
    Case(
        "output-is-a-file",
        compress("--overwrite", output="{tmp}/file.txt"),
        "file.txt is a file, not a folder; choose another --output",
        {"file.txt": "x"},
    ),
    # recipe
    Case("recipe-missing", compress(*R), "recipe file {tmp}/r.yaml does not exist; pass a YAML recipe path"),
    Case("recipe-is-a-folder", compress("--recipe", "{tmp}"), "is a folder; pass a YAML recipe path"),
    Case(
        "recipe-bad-yaml",
        compress(*R),
        "r.yaml, line 2: not valid YAML (mapping values are not allowed here); fix the YAML",
        {"r.yaml": "svd_stage: 1\n  bad: 2\n"},
    ),
    Case("recipe-binary", compress(*R), "r.yaml is not UTF-8 text", {"r.yaml": b"\xba\xff\x00"}),
    Case(
        "recipe-no-stage",
        compress(*R),
        "top-level key `SVDLLMModifier` is not a stage",
        {"r.yaml": "SVDLLMModifier:\n  ratio: 0.2\n"},
    ),
    # issue 22, reproduction 3: keys llmcompressor would drop are refused before any work
    Case(
        "recipe-stage-typo",
        compress(*R),
        "top-level key `quant_stag` is not a stage (llmcompressor reads only keys ending in `_stage`) and "
        "would be ignored with all it holds; rename it, e.g. `quant_stage`",
        {"r.yaml": RECIPE.format(ratio=0.2, extra="") + "quant_stag:\n  quant_modifiers:\n    " + W4},
    ),
    Case(
        "recipe-stage-number-after",
        compress(*R),
        "`svd_stage2` is not a stage",
        {"r.yaml": RECIPE.format(ratio=0.2, extra="").replace("svd_stage", "svd_stage2")},
    ),
    Case(
        "recipe-group-typo",
        compress(*R),
        "`svd_stage.svd_modifier` is not a modifier group",
        {"r.yaml": RECIPE.format(ratio=0.2, extra="").replace("svd_modifiers", "svd_modifier")},
    ),
    Case(
        "recipe-duplicate-modifier",
        compress(*R),
        "r.yaml, line 5: `SVDLLMModifier` appears twice in the same mapping (first on line 3); YAML keeps "
        "only the last",
        recipe("    SVDLLMModifier:\n      ratio: 0.4\n"),
    ),
    Case(
        "recipe-modifier-without-settings",
        compress(*R),
        "`svd_stage.svd_modifiers.SVDLLMModifier` must be a mapping of settings; got nothing",
        {"r.yaml": "svd_stage:\n  svd_modifiers:\n    SVDLLMModifier:\n"},
    ),
    Case("recipe-empty", compress(*R), "recipe file {tmp}/r.yaml is empty", {"r.yaml": "# nothing\n"}),
    Case("recipe-scalar", compress(*R), "holds a YAML int, not a mapping of stages", {"r.yaml": "3\n"}),
    Case("recipe-list", compress(*R), "holds a YAML list, not a mapping", {"r.yaml": "- svd_stage\n"}),
    Case(
        "recipe-gptq-before-svd",
        compress(*R),
        "GPTQModifier comes before SVDLLMModifier, which replaces the Linears by new factor Linears",
        {"r.yaml": "q_stage:\n  q_modifiers:\n    " + W4 + RECIPE.format(ratio=0.2, extra="")},
    ),
    Case(
        "recipe-overrides-match-nothing",
        compress(*R),
        "SVDLLMModifier `overrides` pattern 're:.*q_projx$' matches none of the 14 modules it compresses",
        recipe("      overrides: {'re:.*q_projx$': 0.5}\n"),
        before_load=False,
    ),
    Case(
        "recipe-one-target-matches-nothing",
        compress(*R),
        "SVDLLMModifier `targets` pattern 're:.*typo$' matches no module of the model",
        recipe("      targets: ['re:.*q_proj$', 're:.*typo$']\n"),
        before_load=False,
    ),
    Case(
        "recipe-gptq-target-matches-nothing",
        compress(*R),
        "GPTQModifier `targets` pattern 're:.*svd_w$' matches no module of the model nor the factors",
        recipe("    " + W4.replace("[Linear]", "['re:.*svd_w$']")),
        before_load=False,
    ),
    Case("recipe-ratio-1.5", compress(*R), "must be in (0, 1)", recipe(ratio=1.5)),
    Case("recipe-typo", compress(*R), "ratoi: Extra inputs are not permitted", recipe("      ratoi: 0.3\n")),
    Case("recipe-whitening", compress(*R), "cholesky", recipe("      whitening: qr\n")),
    Case(
        "output-in-proc",
        compress(output="/proc/svdllm-out"),
        "cannot create output folder /proc/svdllm-out: /proc",
    ),
    Case(
        "output-not-ours-overwrite",
        compress("--overwrite", output="{tmp}/kept"),
        "--overwrite refused: {tmp}/kept is not a checkpoint written by svdllm (no config.json with an "
        '"svdllm" record; it holds keep.txt); choose another --output or remove it yourself',
        {"kept/keep.txt": "precious"},
    ),
    Case(
        "output-is-the-model",
        compress("--overwrite", model="{model}", output="{model}"),
        "--output {model} is the input model {model}; --overwrite would delete it",
        edit=("svd", lambda folder: None),
    ),
    Case(
        "output-holds-the-dataset",
        compress("--overwrite", D, "{model}/d.txt", output="{model}"),
        "--output {model} holds the input dataset {model}/d.txt; --overwrite would delete it",
        edit=("svd", lambda folder: (folder / "d.txt").write_text("text " * 500)),
    ),
    # dataset
    Case("dataset-missing", compress(D, "{tmp}/d.txt"), "dataset file '{tmp}/d.txt' does not exist"),
    Case(
        "dataset-folder", compress(D, "{tmp}/d"), "dataset {tmp}/d is a folder; give a .txt", {"d/x.txt": "x"}
    ),
    Case("dataset-empty", compress(D, "{tmp}/d.txt"), "dataset file {tmp}/d.txt is empty", {"d.txt": "  \n"}),
    Case("dataset-csv", compress(D, "{tmp}/d.csv"), "unsupported type '.csv'", {"d.csv": "text\na\n"}),
    Case(
        "dataset-jsonl-line-3",
        compress(D, "{tmp}/d.jsonl"),
        "d.jsonl, line 3, column 14: not valid JSON",
        {"d.jsonl": '{"text": "a"}\n{"text": "b"}\n{"text": "c",]}\n'},
    ),
    Case(
        "dataset-jsonl-no-text",
        compress(D, "{tmp}/d.jsonl"),
        'd.jsonl, line 1: has no "text" field',
        {"d.jsonl": '{"body": "a"}\n'},
    ),
    Case(
        "dataset-text-not-a-string",
        compress(D, "{tmp}/d.jsonl"),
        'd.jsonl, line 2: "text" is 42 (int), not a string',
        {"d.jsonl": '{"text": "a"}\n{"text": 42}\n'},
    ),
    Case(
        "dataset-json-broken",
        compress(D, "{tmp}/d.json"),
        "d.json, line 1, column 2: not valid JSON",
        {"d.json": "[}"},
    ),
    Case(
        "dataset-binary-txt",
        compress(D, "{tmp}/d.txt"),
        "dataset file {tmp}/d.txt is not UTF-8 text",
        {"d.txt": bytes(range(256)) * 8},
    ),
    Case("dataset-nul-bytes", compress(D, "{tmp}/d.txt"), "contains NUL bytes", {"d.txt": "\x00" * 5000}),
    Case(
        "dataset-too-short",
        compress(D, "{tmp}/d.txt"),
        "fewer than --seq-len + 1",
        {"d.txt": "just a few words"},
        before_load=False,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tiny_dir, svd_dir, tmp_path, capsys, monkeypatch):
    check_bad_input(case, tiny_dir, svd_dir, tmp_path, capsys, monkeypatch)
