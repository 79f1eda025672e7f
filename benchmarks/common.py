"""Shared set-up of the benchmarks: one model load, one calibration set, one held-out set.

Every benchmark prints a markdown table and writes JSON (and a PNG where a plot reads
better) into benchmarks/results/. Nothing here is part of the test suite.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import svdllm_plugin  # noqa: F401  (registers the modifiers)
from svdllm_plugin.data import calibration_dataset, eval_windows, load_text, other_domain_text, spread_windows
from svdllm_plugin.evaluate import perplexity
from svdllm_plugin.models import load_model_and_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Bench:
    model: torch.nn.Module
    tokenizer: object
    calib: object
    windows: torch.Tensor
    seq_len: int
    other: torch.Tensor | None = None  # held-out windows of another domain (license prose)

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)

    def ppl(self, model) -> float:
        return perplexity(model, self.windows, progress=False)

    def ppl_other(self, model) -> float:
        return perplexity(model, self.other, progress=False) if self.other is not None else float("nan")


def setup(
    model: str, num_samples: int, seq_len: int, eval_windows_: int, dataset: str | None = None
) -> Bench:
    base, tokenizer = load_model_and_tokenizer(model)
    calib = calibration_dataset(tokenizer, load_text(dataset, "calibration"), num_samples, seq_len)
    windows = eval_windows(tokenizer, load_text(dataset, "evaluation"), seq_len, eval_windows_)
    other = spread_windows(tokenizer, other_domain_text(), seq_len, eval_windows_)
    return Bench(base, tokenizer, calib, windows, seq_len, other)


def run_recipe(bench: Bench, recipe, model=None, **oneshot_kwargs) -> tuple[torch.nn.Module, float]:
    """oneshot on a fresh copy; returns the model and wall seconds."""
    from llmcompressor import oneshot

    model = model if model is not None else bench.fresh()
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=bench.tokenizer,
        dataset=bench.calib,
        recipe=recipe,
        num_calibration_samples=len(bench.calib),
        max_seq_length=bench.seq_len,
        **oneshot_kwargs,
    )
    return model, time.perf_counter() - start


@torch.no_grad()
def forward_floor(bench: Bench) -> float:
    """Seconds of one plain forward pass of the dense model over the calibration data."""
    model = bench.model.eval()
    start = time.perf_counter()
    for row in bench.calib:
        model(torch.tensor([row["input_ids"]]))
    return time.perf_counter() - start


def markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path
