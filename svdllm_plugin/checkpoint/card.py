"""The model card (README.md) of a compressed folder: what it is, how it was made, how to load it."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

__all__ = ["write_model_card"]

_LOAD_STOCK = """\
```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model = AutoModelForCausalLM.from_pretrained("{folder}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{folder}", trust_remote_code=True)
generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
print(generate("The capital of France is", max_new_tokens=20)[0]["generated_text"])
```"""

_LOAD_PLUGIN = """\
```python
from svdllm_plugin.checkpoint import load_pretrained

model = load_pretrained("{folder}")
```"""


def write_model_card(
    folder, record: dict, base_model: str = "unknown", params: dict | None = None, name: str | None = None
) -> Path:
    """Write ``folder``/README.md from the ``svdllm`` record of its config.json.

    ``params`` may hold ``params_before`` / ``params_after`` / ``bytes_before``; the bytes after
    are the safetensors files in ``folder``. Perplexities come from the record's ``ppl_before`` /
    ``ppl_after`` (what the compression run measured), shown only when present. ``name`` is the
    folder name the loading examples use (default: ``folder``'s own; differs while writing atomically).
    """
    folder = Path(folder)
    params = params or {}
    ranks = record.get("ranks") or {}
    packed = record.get("format") == "packed"
    bytes_after = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    lines = [
        "---",
        "library_name: transformers",
        "tags: [svd-llm, low-rank, compressed, svdllm-plugin]",
        f"base_model: {base_model}",
        "---",
        "",
        f"# {Path(base_model).name or base_model}, compressed with SVD-LLM",
        "",
        f"Written by svdllm-plugin {record.get('version', '?')}: {len(ranks)} Linear layers of "
        f"`{base_model}` "
        "are replaced by two low-rank factors (`svd_v`: rank x in, `svd_u`: out x rank; truncation-aware "
        "whitening SVD)"
        + (
            ", stored as packed integers (compressed-tensors pack-quantized)."
            if packed
            else ", stored as float tensors."
        ),
        *_compensation_lines(record.get("compensation") or {}),
        "",
        "## Size",
        "",
        "| | before | after |",
        "|---|---|---|",
    ]
    if params.get("params_before"):
        lines.append(f"| parameters | {params['params_before']:,} | {params['params_after']:,} |")
    if params.get("bytes_before"):
        lines.append(
            f"| weight bytes | {params['bytes_before']:,} (dense, in memory) "
            f"| {bytes_after:,} (safetensors) |"
        )
    if record.get("ppl_before") is not None or record.get("ppl_after") is not None:
        lines.append(
            f"| held-out perplexity (measured by the run) | {_num(record.get('ppl_before'))} | "
            f"{_num(record.get('ppl_after'))} |"
        )
    if record.get("ppl_other_before") is not None or record.get("ppl_other_after") is not None:
        lines.append(
            f"| other-domain perplexity (license prose) | {_num(record.get('ppl_other_before'))} | "
            f"{_num(record.get('ppl_other_after'))} |"
        )
    lines += ["", "## Ranks", "", *_ranks_table(ranks), ""]
    lines += [
        "## Recipe",
        "",
        "The llm-compressor recipe is in `recipe.yaml`."
        if (folder / "recipe.yaml").exists()
        else "No recipe was recorded.",
        "",
        "## Loading",
        "",
        "With transformers alone (the folder's `modeling_svdllm.py` rebuilds the factor structure; "
        "it imports only torch and transformers"
        + (", and transformers reads the packed weights with `compressed-tensors`" if packed else "")
        + "):",
        "",
        _LOAD_STOCK.format(folder=name or folder.name),
        "",
        "With svdllm-plugin installed:",
        "",
        _LOAD_PLUGIN.format(folder=name or folder.name),
        "",
        "Without `trust_remote_code=True` transformers refuses the folder (`model_type: svdllm`) rather "
        "than load it into the dense architecture.",
        "",
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


def _compensation_lines(ranks: dict[str, int]) -> list[str]:
    """What the compensation step added: quantized Linears plus low-rank error terms."""
    if not ranks:
        return []
    return [
        "",
        f"{len(ranks)} quantized Linear layers carry a low-rank term fitted to their quantization error "
        "(`base` + `lowrank_l(lowrank_r(x))`, LowRankCompensationModifier; ranks "
        f"{min(ranks.values())}-{max(ranks.values())}).",
    ]


def _ranks_table(ranks: dict[str, int]) -> list[str]:
    """Per projection kind (q_proj, down_proj, ...): modules, min / median / max rank."""
    if not ranks:
        return ["No layer is factorized."]
    by_kind = defaultdict(list)
    for name, k in ranks.items():
        by_kind[name.rpartition(".")[2]].append(k)
    rows = ["| module | count | min rank | median rank | max rank |", "|---|---|---|---|---|"]
    for kind, ks in sorted(by_kind.items()):
        rows.append(f"| {kind} | {len(ks)} | {min(ks)} | {statistics.median(ks):g} | {max(ks)} |")
    return rows


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"
