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
    """One table per methods run (each run is one process: its rows compare like for like);
    the plot from the grid run (methods_grid.json) when present, else from every run."""
    paths = sorted(RESULTS.glob("methods*.json"))
    if not paths:
        return
    columns = ["config", "ratio", "params_after", "ppl", "ppl_other", "seconds"]
    for path in paths:
        run = json.loads(path.read_text())
        rows = run["rows"]
        dense, other = run.get("dense_ppl", float("nan")), run.get("dense_ppl_other", float("nan"))
        print(f"### {path.stem} (dense perplexity {dense:.3f} / other domain {other:.3f})\n")
        print(markdown(rows, [c for c in columns if all(c in r for r in rows)]))
        print()
    chosen = [RESULTS / "methods_grid.json", RESULTS / "methods_best.json"]
    runs = [json.loads(p.read_text()) for p in (chosen if all(p.exists() for p in chosen) else paths)]
    rows = {(r["config"], r["ratio"]): r for run in runs for r in run["rows"]}  # one row per point
    rows = sorted(rows.values(), key=lambda r: (r["config"], r["ratio"]))
    collapsed = {r["config"] for r in rows if r["ppl"] > 1e4}  # worse than guessing: shown in the table only
    shown = [r for r in rows if r["config"] not in collapsed]
    print(f"plot leaves out the collapsed configs {sorted(collapsed)} (perplexity > 1e4)")
    plot(shown, runs[0]["dense_ppl"], "methods", runs[0].get("dense_ppl_other"))


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


def frontier() -> None:
    """The latest frontier runs (frontier_h: GPTQ 8/4/3/2 and the 0.2 points; frontier_i: the 0.1
    points) as one table and frontier.png."""
    from frontier import plot as plot_frontier

    paths = [RESULTS / "frontier_h.json", RESULTS / "frontier_i.json"]
    if not all(p.exists() for p in paths):
        return
    rows = [r for p in paths for r in json.loads(p.read_text())["rows"]]
    rows.sort(key=lambda r: (r["ratio"] > 0, -r["bits"], "best" in r["point"], -r["ratio"]))
    print("### frontier (frontier_h + frontier_i)\n")
    print(markdown(rows, ["point", "bits", "MB", "svd_ppl", "ppl", "x_svd", "ppl_other", "seconds"]))
    print()
    plot_frontier(rows, "frontier")


def honest_frontier() -> None:
    """The issue-17 frontier (frontier.py --points): every frontier_17*.json run as one table (bf16
    checkpoints, bits per decoder-Linear weight, validation and test perplexities in and out of
    domain) and frontier_17.png; a point measured twice keeps its first run."""
    from frontier import HONEST_COLUMNS, plot_honest

    rows = {}
    for path in sorted(RESULTS.glob("frontier_17*.json")):
        for row in json.loads(path.read_text())["rows"]:
            if "error" not in row:
                rows.setdefault(row["point"], row)
    if not rows:
        return
    ordered = sorted(rows.values(), key=lambda r: -r["bits"])
    print("### frontier_17 (choose on ppl_val, read ppl_test)\n")
    print(markdown(ordered, HONEST_COLUMNS))
    print()
    plot_honest(ordered, "frontier_17")


if __name__ == "__main__":
    methods()
    frontier()
    honest_frontier()
    table("lora_other", ["variant", "ppl", "ppl_other", "seconds", "rounds"])
    table("lora", ["variant", "ppl", "seconds", "rounds"])
    reference()
