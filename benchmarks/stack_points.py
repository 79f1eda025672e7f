"""The honest frontier (issue 17): every point a recipe, saved bf16, two byte figures, four perplexities.

Used by ``frontier.py --points``. A point spec joins steps with '+':

    W4 | W3g32          GPTQ W4 group 64 / W3 group 32 on every decoder Linear
    Q+W3                QuIP random-Hadamard input rotation, then GPTQ W3
    S0.2+W4 | S0.2b+W4  SVD-LLM ratio 0.2 (b: Fisher rows + update + intra_layer) then GPTQ W4 on the factors
    W2+C32              GPTQ W2, then LowRankCompensationModifier rank 32 (bf16 factors)
    recipes/x.yaml      any recipe file (e.g. recipes/stack_w3.yaml, benchmarks/stack_candidates/*.yaml)

Each point is written with the plugin's save_pretrained (float tensors in bf16) and measured with
svdllm_plugin.checkpoint.bits: safetensors bytes and bits per decoder-Linear weight. Perplexities on
the validation and the test windows, of the calibration's domain and of another (license prose).
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

from svdllm_plugin.checkpoint import save_pretrained
from svdllm_plugin.checkpoint.bits import checkpoint_bits
from svdllm_plugin.data import held_out_splits, load_text, other_domain_text, spread_splits
from svdllm_plugin.evaluate import perplexity
from svdllm_plugin.search import Candidate

_STEP = {
    "svd": re.compile(r"^S(\d*\.?\d+)(b?)$"),
    "quip": re.compile(r"^Q$"),
    "gptq": re.compile(r"^W(\d)(?:g(\d+))?$"),
    "comp": re.compile(r"^C(\d+)$"),
}


def parse_point(spec: str) -> Candidate:
    settings: dict = {}
    for step in spec.split("+"):
        kind = next((k for k, pattern in _STEP.items() if pattern.match(step)), None)
        if kind is None:
            raise SystemExit(
                f"point {spec!r}: step {step!r} is none of S<ratio>[b], Q, W<bits>[g<group>], C<rank>"
            )
        groups = _STEP[kind].match(step).groups()
        if kind == "svd":
            settings.update(ratio=float(groups[0]), svd_best=bool(groups[1]))
        elif kind == "quip":
            settings["transform"] = True
        elif kind == "gptq":
            settings.update(bits=int(groups[0]), group_size=int(groups[1] or 64))
        else:
            settings["comp_rank"] = int(groups[0])
    if "bits" not in settings:
        raise SystemExit(f"point {spec!r} has no GPTQ step W<bits>")
    return Candidate(**settings)


def held_out(bench, dataset=None, count: int = 16) -> dict:
    """{"val", "test", "other_val", "other_test"}: disjoint windows (svdllm_plugin.data)."""
    held = held_out_splits(bench.tokenizer, load_text(dataset, "evaluation"), bench.seq_len, count)
    other = spread_splits(bench.tokenizer, other_domain_text(), bench.seq_len, count)
    return {
        "val": held["validation"],
        "test": held["test"],
        "other_val": other["validation"],
        "other_test": other["test"],
    }


def measure(model, tokenizer, windows: dict, recipe: str | None = None) -> dict:
    """Perplexities on the four splits and both byte figures of the bf16 checkpoint."""
    row = {f"ppl_{k}": perplexity(model, w, progress=False) for k, w in windows.items()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / "ckpt", tokenizer, save_dtype="bf16", recipe=recipe)
        size = checkpoint_bits(folder)
    row["bits"] = size["decoder_linear_bits"]
    row["MB"] = size["safetensors_bytes"] / 1e6
    return row


def run_point(bench, spec: str, windows: dict, run_recipe) -> dict:
    """One frontier point: a spec (see the module doc) or a recipe file (``*.yaml``), run the way
    ``svdllm compress`` runs it (compress.pass_settings), saved bf16 and measured."""
    from svdllm_plugin.compress import pass_settings
    from svdllm_plugin.search import _parse

    if spec.endswith(".yaml"):
        text = Path(spec).read_text(encoding="utf-8")
        row = dict(point=spec, name=Path(spec).stem, wbits=None, ratio=None)
    else:
        candidate = parse_point(spec)
        text = candidate.recipe()
        row = dict(point=spec, name=candidate.name, wbits=candidate.bits, ratio=candidate.ratio)
    row["family"] = family(text)
    start = time.perf_counter()
    model, _ = run_recipe(bench, text, **pass_settings(_parse(text)))
    row.update(measure(model, bench.tokenizer, windows, text), seconds=time.perf_counter() - start)
    return row


def family(recipe_text: str) -> str:
    """The plot's series of a recipe: which steps it stacks."""
    steps = [
        ("SVDLLMModifier", "SVD"),
        ("SequentialLoRAModifier", "LoRA"),
        ("QuIPModifier", "QuIP"),
        ("GPTQModifier", "GPTQ"),
        ("LowRankCompensationModifier", "compensation"),
    ]
    return " + ".join(label for key, label in steps if key in recipe_text)


def label(row: dict) -> str:
    """Short name of a point: the spec, or a recipe file's stem."""
    return Path(row["point"]).stem if row["point"].endswith(".yaml") else row["point"]


def plain_gptq(row: dict) -> bool:
    return row.get("family") == "GPTQ" and row.get("wbits") is not None and "+" not in row["point"]


def select_on_validation(rows: list[dict]) -> list[dict]:
    """For every plain GPTQ point: the stacked point chosen on VALIDATION perplexity among those no
    larger on disk, and how it does on TEST in and out of domain (what the README reports)."""
    ok = [r for r in rows if "error" not in r and r["point"] != "dense"]
    picks = []
    for base in sorted((r for r in ok if plain_gptq(r)), key=lambda r: -r["wbits"]):
        rivals = [r for r in ok if not plain_gptq(r) and r["MB"] <= base["MB"]]
        pick = min(rivals, key=lambda r: r["ppl_val"], default=None)
        entry = dict(
            budget=label(base),
            budget_MB=base["MB"],
            budget_test=base["ppl_test"],
            budget_other_test=base["ppl_other_test"],
            tried=len(rivals),
        )
        if pick is not None:
            wins = pick["ppl_test"] < base["ppl_test"] and pick["ppl_other_test"] < base["ppl_other_test"]
            entry.update(
                chosen=label(pick),
                MB=pick["MB"],
                bits=pick["bits"],
                val=pick["ppl_val"],
                test=pick["ppl_test"],
                other_test=pick["ppl_other_test"],
                wins=wins,
            )
        picks.append(entry)
    return picks
