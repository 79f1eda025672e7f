"""Merge the JSON of several benchmark runs into the README's tables and plots.

    .venv/bin/python benchmarks/report.py

Reads benchmarks/results/methods*.json (runs of methods.py with different --name),
frontier.json, lora.json and reference_svdllm.json; prints markdown and rewrites
methods.png from all method rows together.
"""

from __future__ import annotations

import json

from common import RESULTS, markdown
from methods import plot


def methods() -> None:
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("methods*.json"))]
    if not runs:
        return
    rows = sorted((r for run in runs for r in run["rows"]), key=lambda r: (r["config"], r["ratio"]))
    for row in rows:  # x floor is only comparable where the floor was measured just before the run
        if "floor_forward_s" not in row:
            row["x_floor"] = "-"
    dense = runs[0]["dense_ppl"]
    floors = sorted({round(run["floor_forward_s"], 1) for run in runs})
    print(f"### Methods (dense perplexity {dense:.3f}; forward pass over calibration data {floors} s)\n")
    print(markdown(rows, ["config", "ratio", "ppl", "seconds", "statistics_s", "factorization_s", "x_floor"]))
    plot(rows, dense, "methods")
    print()


def table(name: str, columns: list[str]) -> None:
    path = RESULTS / f"{name}.json"
    if path.exists():
        data = json.loads(path.read_text())
        rows = data.get("rows", [])
        for row in rows:
            row.setdefault("MB", row.get("bytes", 0) / 1e6)
        print(f"### {name}\n")
        print(markdown(rows, columns))
        print()


def reference() -> None:
    path = RESULTS / "reference_svdllm.json"
    if path.exists():
        d = json.loads(path.read_text())
        print("### reference_svdllm\n")
        print(
            markdown(
                [d],
                [
                    "ratio",
                    "num_samples",
                    "seq_len",
                    "ppl_dense",
                    "ppl_reference",
                    "ppl_plugin",
                    "relative_difference",
                    "factor_rel_frobenius_median",
                ],
            )
        )
        print()


if __name__ == "__main__":
    methods()
    table("frontier", ["point", "ratio", "bits", "MB", "ppl", "seconds"])
    table("lora", ["variant", "ppl", "seconds", "rounds"])
    reference()
