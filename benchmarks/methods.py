"""Methods x allocations x ratios on one model: held-out perplexity, time, memory.

    .venv/bin/python benchmarks/methods.py [--ratios 0.2 0.4 0.6] [--configs svd asvd svd_llm ...]

Writes benchmarks/results/methods.{json,md,png}. Each run compresses a fresh copy of the
model through llmcompressor's oneshot; time is split into statistics (calibration forward
passes and hooks) and factorization (the decompositions, summed from the modifier's
per-module log). `floor` = one plain forward pass over the calibration data + the
decompositions; `x floor` is total / floor.
"""

from __future__ import annotations

import argparse
import resource
import time

from common import forward_floor, markdown, run_recipe, save, setup

from svdllm_plugin import SVDLLMModifier
from svdllm_plugin.compress import single_pass

CONFIGS = {
    "svd": dict(method="svd"),
    "fwsvd": dict(method="fwsvd"),
    "asvd": dict(method="asvd"),
    "svd_llm": dict(method="svd_llm"),
    "svd_llm_v2": dict(method="svd_llm_v2"),
    "svd_llm+loss": dict(method="svd_llm", allocation="loss"),
    "svd_llm+update": dict(method="svd_llm", closed_form_update=True),
    "svd_llm+output": dict(method="svd_llm", update="output"),
    "svd_llm+output_u": dict(method="svd_llm", update="output_u"),
    "svd_llm+output_u_damp": dict(method="svd_llm", update="output_u", update_damp=1e-2),
    "svd_llm+v2alloc": dict(method="svd_llm", allocation="v2"),
    "svd_llm+global": dict(method="svd_llm", allocation="global"),
    "svd_llm+fisher": dict(method="svd_llm", row_weighting="fisher"),
    "svd_llm+fisher+update": dict(method="svd_llm", row_weighting="fisher", closed_form_update=True),
    "svd_llm+update+intra": dict(method="svd_llm", update="input", intra_layer=True),
    "svd_llm+fisher+update+intra": dict(
        method="svd_llm", row_weighting="fisher", update="input", intra_layer=True
    ),
    "svd_llm+fisher16+update": dict(
        method="svd_llm", row_weighting="fisher", update="input", fisher_batches=16
    ),
    "svd_llm+fisher16+update+intra": dict(
        method="svd_llm", row_weighting="fisher", update="input", intra_layer=True, fisher_batches=16
    ),
    "svd_llm+propagated+intra": dict(method="svd_llm", activations="propagated", intra_layer=True),
    "svd_llm_v2+loss": dict(method="svd_llm_v2", allocation="loss"),
    "svd_llm+propagated": dict(method="svd_llm", activations="propagated"),
    "asvd+sensitivity": dict(method="asvd", allocation="sensitivity"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--runs", nargs="+", default=None, help="CONFIG@RATIO pairs instead of the grid")
    parser.add_argument("--name", default="methods")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense model's perplexities")
    parser.add_argument("--skip-floor", action="store_true", help="no forward floor (x_floor is nan)")
    args = parser.parse_args()

    bench = setup(args.model, args.num_samples, args.seq_len, args.eval_windows)
    nan = float("nan")
    dense_ppl = bench.ppl(bench.model) if not args.no_dense else nan
    dense_other = bench.ppl_other(bench.model) if not args.no_dense else nan
    floor_forward = forward_floor(bench) if not args.skip_floor else nan
    rows = []
    grid = [(c, r) for c in args.configs for r in args.ratios]
    if args.runs:
        grid = [(run.split("@")[0], float(run.split("@")[1])) for run in args.runs]

    def save_run():
        """The JSON so far (rewritten after every row: a stopped run keeps what it measured)."""
        dense = dict(dense_ppl=dense_ppl, dense_ppl_other=dense_other, floor_forward_s=floor_forward)
        return save(args.name, dict(args=vars(args), **dense, rows=rows))

    for config, ratio in grid:
        settings = CONFIGS[config]
        modifier = SVDLLMModifier(ratio=ratio, **settings)
        if not args.skip_floor:
            floor_forward = forward_floor(bench)  # re-measured per run: load on the machine varies
        model, seconds = run_recipe(bench, modifier, propagate_error=not single_pass([modifier]))
        factorization = sum(r["seconds"] for r in modifier.records)
        row = dict(
            config=config,
            ratio=ratio,
            achieved_ratio=1
            - sum(r["params_after"] for r in modifier.records)
            / sum(r["params_before"] for r in modifier.records),
            params_after=sum(r["params_after"] for r in modifier.records),
            ppl=bench.ppl(model),
            ppl_other=bench.ppl_other(model),
            seconds=seconds,
            statistics_s=seconds - factorization,
            factorization_s=factorization,
            floor_forward_s=floor_forward,
            x_floor=seconds / (floor_forward + factorization),
            peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        )
        if modifier.sensitivity_cost:
            row["search_s"] = modifier.sensitivity_cost["seconds"]
        rows.append(row)
        print(markdown([row], list(row)), flush=True)
        save_run()
        del model
    columns = [
        "config",
        "ratio",
        "achieved_ratio",
        "params_after",
        "ppl",
        "ppl_other",
        "seconds",
        "statistics_s",
        "factorization_s",
        "x_floor",
        "peak_rss_gib",
    ]
    table = (
        f"dense perplexity {dense_ppl:.3f} (other domain {dense_other:.3f}); "
        f"floor forward pass {floor_forward:.1f}s\n\n" + markdown(rows, columns)
    )
    print(table)
    save_run().with_suffix(".md").write_text(table + "\n")
    plot(rows, dense_ppl, args.name, dense_other)


def plot(rows: list[dict], dense_ppl: float, name: str, dense_other: float | None = None) -> None:
    """Perplexity vs ratio per config: held-out text of the calibration's domain (left) and of
    another domain (right, when the rows have it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from common import RESULTS

    panels = [("ppl", "held-out perplexity, calibration domain (log)", dense_ppl)]
    if all("ppl_other" in r for r in rows):
        panels.append(("ppl_other", "perplexity, other domain (log)", dense_other))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, label, dense) in zip(axes[0], panels):
        for config in dict.fromkeys(r["config"] for r in rows):
            pts = sorted((r["ratio"], r[key]) for r in rows if r["config"] == config)
            ax.plot(*zip(*pts), marker="o", label=config)
        if dense is not None and dense == dense:
            ax.axhline(dense, color="gray", ls="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("ratio (fraction of each matrix's parameters removed)")
        ax.set_ylabel(label)
    axes[0][0].set_title("SmolLM2-135M: method x ratio")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f}s")
