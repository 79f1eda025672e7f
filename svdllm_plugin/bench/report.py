"""Output of `svdllm bench`: the table of measurements and ratios, the plot (matplotlib, optional)."""

from __future__ import annotations

__all__ = ["format_table", "plot", "check_plot_path"]


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def format_table(results: dict) -> str:
    """Markdown tables: measured values per model, then ratios against the first model.

    Speed ratios are baseline time / model time (above 1: the model is faster); the FLOP and
    byte ratios are model / baseline (below 1: the model does or reads less).
    """
    names = [m["name"] for m in results["models"]]
    base = results["models"][0]
    lines = [
        f"device: {results['device']}; median of {results['repeats']} runs after {results['warmup']} warm-up"
    ]
    lines.append("")
    lines.append("| model | weights MiB | x baseline | notes |")
    lines.append("|---|---:|---:|---|")
    for m in results["models"]:
        lines.append(
            f"| {m['name']} | {m['weight_bytes'] / 2**20:.1f} | "
            f"{_ratio(m['weight_bytes'], base['weight_bytes'])} | {', '.join(m['notes']) or '-'} |"
        )
    lines.append("")
    head = "| measurement | " + " | ".join(names) + " |"
    lines.append(head)
    lines.append("|---|" + "---:|" * len(names))
    for row in results["prefill"]:
        label = f"prefill {row['batch']}x{row['length']} tok/s"
        lines.append(
            f"| {label} | " + " | ".join(f"{p['tokens_per_s']:.0f}" for p in row["per_model"]) + " |"
        )
        if row["batch"] == 1:
            lines.append(
                f"| time to first token, {row['length']}-token prompt (ms) | "
                + " | ".join(f"{1000 * p['median_s']:.0f}" for p in row["per_model"])
                + " |"
            )
    for row in results["decode"]:
        lines.append(
            f"| decode @{row['context']} tok/s | "
            + " | ".join(f"{p['tokens_per_s']:.1f}" for p in row["per_model"])
            + " |"
        )
    for row in results["decode"]:
        lines.append(
            f"| prefill of {row['context']} tokens: peak extra MiB (KV cache incl.) | "
            + " | ".join(f"{p['prefill_peak_extra_bytes'] / 2**20:.1f}" for p in row["per_model"])
            + " |"
        )
    if results["decode"]:
        lines.append(
            "| KV cache bytes/token | "
            + " | ".join(f"{p['kv_bytes_per_token']:.0f}" for p in results["decode"][0]["per_model"])
            + " |"
        )
    if len(names) > 1:
        lines.append("")
        lines.append(
            "| vs " + names[0] + " | model | speedup (measured) | FLOP ratio | byte ratio | spread |"
        )
        lines.append("|---|---|---:|---:|---:|---|")
        for row in results["prefill"]:
            b = row["per_model"][0]
            for name, p in zip(names[1:], row["per_model"][1:]):
                shape = f"{row['batch']}x{row['length']}"
                lines.append(
                    f"| prefill {shape} | {name} | {_ratio(b['median_s'], p['median_s'])} | "
                    f"{_ratio(p['macs'], b['macs'])} | "
                    f"{_ratio(_model_bytes(results, name), base['weight_bytes'])} | {_spread(p)} |"
                )
        for row in results["decode"]:
            b = row["per_model"][0]
            for name, p in zip(names[1:], row["per_model"][1:]):
                lines.append(
                    f"| decode @{row['context']} | {name} | {_ratio(b['median_s'], p['median_s'])} | "
                    f"{_ratio(p['macs_per_token'], b['macs_per_token'])} | "
                    f"{_ratio(p['bytes_per_token'], b['bytes_per_token'])} | {_spread(p)} |"
                )
        if results["decode"]:
            row = results["decode"][0]["per_model"]
            for name, p in zip(names[1:], row[1:]):
                lines.append(
                    f"| KV cache bytes/token | {name} | - | - | "
                    f"{_ratio(p['kv_bytes_per_token'], row[0]['kv_bytes_per_token'])} | - |"
                )
    return "\n".join(lines)


def _model_bytes(results, name) -> int:
    return next(m["weight_bytes"] for m in results["models"] if m["name"] == name)


def _spread(p) -> str:
    """(max - min) / median of the timed runs: how noisy the measurement was."""
    return f"{(p['max_s'] - p['min_s']) / p['median_s']:.0%}"


def plot(results: dict, path: str) -> None:
    """Prefill tokens/s per shape, decode tokens/s per context, KV bytes/token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m["name"] for m in results["models"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(names)
    shapes = [f"{r['batch']}x{r['length']}" for r in results["prefill"]]
    for i, name in enumerate(names):
        axes[0].bar(
            [x + i * width for x in range(len(shapes))],
            [r["per_model"][i]["tokens_per_s"] for r in results["prefill"]],
            width,
            label=name,
        )
        axes[1].plot(
            [r["context"] for r in results["decode"]],
            [r["per_model"][i]["tokens_per_s"] for r in results["decode"]],
            marker="o",
            label=name,
        )
    axes[0].set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(shapes))], shapes)
    axes[0].set(title="prefill", xlabel="batch x length", ylabel="tokens/s")
    axes[1].set(title="decode (batch 1)", xlabel="context length", ylabel="tokens/s")
    if results["decode"]:
        axes[1].set_xscale("log", base=2)
        kv = [p["kv_bytes_per_token"] / 1024 for p in results["decode"][0]["per_model"]]
        axes[2].bar(range(len(names)), kv, color=[f"C{i}" for i in range(len(names))])
        axes[2].set_xticks(range(len(names)), names, rotation=15, ha="right")
    axes[2].set(title="KV cache per token", ylabel="KiB")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['device']}; medians of {results['repeats']} alternating runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_plot_path(path: str) -> str:
    """The file ``plot`` will write (``.png`` added to a bare name, as matplotlib does), refused now
    when it is a folder, cannot be created, or has a type matplotlib cannot write."""
    from svdllm_plugin.atomic import check_output_file

    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install 'svdllm-plugin[bench]'") from error
    file = check_output_file(path, "--plot", suffix=".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if file.suffix[1:].lower() not in formats:
        raise ValueError(
            f"--plot {path}: matplotlib cannot write {file.suffix!r} files; "
            "end the name in .png, .pdf or .svg"
        )
    return str(file)
