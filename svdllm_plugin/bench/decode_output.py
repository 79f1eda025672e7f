"""Output of `svdllm bench --synthetic`: the markdown table and the plot of ``bench.decode`` rows."""

from __future__ import annotations

__all__ = ["format_rows", "plot_rows"]


def _cell(row: dict) -> str:
    text = f"{row['time_vs_dense']:.2f}"
    if row.get("same_tokens") is False:
        text += " (tokens differ)"
    return text


def format_rows(results: dict) -> str:
    """One markdown table: time factorized / dense per regime, batch and context; limits beside."""
    rows = results["rows"]
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] > 0})
    floor = any("floor_ms" in r for r in rows)
    lines = [
        f"{results['synthetic']} ({results['layers']} layers, {results['dtype']}, random weights) on "
        f"{results['device']}; medians of {results['repeats']} alternating runs, "
        f"{results['decode_tokens']} tokens per decode run; time factorized / dense (below 1: faster)",
        "",
        "| regime | batch | context | dense ms | " + " | ".join(f"{r:g}" for r in ratios) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(ratios),
    ]
    groups = {}
    for r in rows:
        groups.setdefault((r["regime"], r["batch"], r["context"]), {})[r["ratio"]] = r
    for (regime, batch, context), by_ratio in groups.items():
        dense = by_ratio[0.0]
        ms = dense.get("ms_per_token", dense.get("ms"))
        cells = [_cell(by_ratio[r]) if r in by_ratio else "-" for r in ratios]
        lines.append(f"| {regime} | {batch} | {context} | {ms:.2f} | " + " | ".join(cells) + " |")
    any_row = {r["ratio"]: r for r in rows}
    lines.append(
        "| decoder-layer parameters | | | | "
        + " | ".join(f"{any_row[r]['param_ratio']:.2f}" for r in ratios)
        + " |"
    )
    read = {r["ratio"]: r["read_ratio"] for r in rows if "read_ratio" in r}
    if read:
        lines.append(
            "| weights read per decode step (memory-bound limit) | | | | "
            + " | ".join(f"{read[r]:.2f}" if r in read else "-" for r in ratios)
            + " |"
        )
    if floor:
        for (regime, batch, context), by_ratio in groups.items():
            if regime in ("eager", "latent") and "floor_ms" in by_ratio[0.0]:
                kv = "latent KV" if regime == "latent" else "KV"
                lines.append(
                    f"| bytes-read floor ({kv}) | {batch} | {context} | "
                    f"{by_ratio[0.0]['floor_ms']:.2f} | "
                    + " | ".join(
                        f"{by_ratio[r]['floor_vs_dense']:.2f}" if r in by_ratio else "-" for r in ratios
                    )
                    + " |"
                )
    best = [r for r in rows if r.get("time_vs_dense_best") is not None and r["ratio"] > 0]
    if best:
        lines.append("")
        lines.append("best regime of each model against the dense model's best (ms per token):")
        for batch, context in sorted({(r["batch"], r["context"]) for r in best}):
            at = [
                r for r in rows if (r["batch"], r["context"]) == (batch, context) and r["regime"] != "prefill"
            ]
            parts = []
            for ratio in [0.0, *ratios]:
                mine = min((r for r in at if r["ratio"] == ratio), key=lambda r: r["ms_per_token"])
                ms, rel = mine["ms_per_token"], mine["time_vs_dense_best"]
                parts.append(f"{ratio:g}: {mine['regime']} {ms:.2f} ({rel:.2f})")
            lines.append(f"- batch {batch}, context {context}: " + "; ".join(parts))
    return "\n".join(lines)


def plot_rows(results: dict, path: str) -> None:
    """Bars: time factorized / dense per regime (batch and context), the parameter ratio as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["ratio"] > 0]
    ratios = sorted({r["ratio"] for r in rows})
    keys = list(dict.fromkeys((r["regime"], r["batch"], r["context"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys) + 2), 4.2))
    width = 0.8 / len(ratios)
    for i, ratio in enumerate(ratios):
        values = [
            next(
                (
                    r["time_vs_dense"]
                    for r in rows
                    if (r["regime"], r["batch"], r["context"]) == k and r["ratio"] == ratio
                ),
                0,
            )
            for k in keys
        ]
        ax.bar(
            [x + i * width for x in range(len(keys))], values, width, label=f"ratio {ratio:g}", color=f"C{i}"
        )
        mine = [r for r in rows if r["ratio"] == ratio]
        limit = next((r["read_ratio"] for r in mine if "read_ratio" in r), mine[0]["param_ratio"])
        ax.axhline(limit, color=f"C{i}", linestyle=":", linewidth=1)
    ax.axhline(1.0, color="black", linewidth=0.8)
    labels = [f"{reg}\nb{b} @{c}" for reg, b, c in keys]
    ax.set_xticks([x + width * (len(ratios) - 1) / 2 for x in range(len(keys))], labels, fontsize=8)
    ax.set(ylabel="time factorized / dense", title="dotted: weights read per decode step / dense")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"{results['synthetic']} ({results['layers']} layers, {results['dtype']}) on {results['device']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
