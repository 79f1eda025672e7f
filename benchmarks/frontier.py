"""Size / quality frontier: dense GPTQ at 8/4/3/2 bits versus SVD-LLM ratios x GPTQ bits.

    .venv/bin/python benchmarks/frontier.py [--gptq-bits 8 4 3 2] [--svd 0.2:4 0.4:4 ...]

Every point is a real packed checkpoint (compressed-tensors pack-quantized) written with
the plugin's save_pretrained; its size is the bytes of its safetensors files on disk.
Non-quantized tensors (embeddings, norms) stay float32 in every checkpoint, the same for
all points. Writes benchmarks/results/frontier.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import RESULTS, markdown, run_recipe, save, setup
from stack_points import label as point_label
from stack_points import select_on_validation

from svdllm_plugin.checkpoint import save_pretrained


def gptq(bits: int, targets: str = "Linear", group_size: int = 64):
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = dict(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    return GPTQModifier(
        config_groups={"group_0": dict(targets=[targets], weights=weights)}, ignore=["re:.*lm_head"]
    )


def svd(ratio: float, multiple: int = 64, variant: str = "", fisher_batches: int = 16):
    """SVD-LLM at ``ratio``; ``variant`` '+'-joined: ``output`` (update: output), ``update``
    (update: input), ``fisher`` (row_weighting: fisher on ``fisher_batches`` samples), ``intra``
    (intra_layer), ``best`` (= fisher+update+intra, the best whitening-only configuration measured),
    a sigma placement (``split``, ``u``, ``v``); ``qa`` is handled by ``quantize``."""
    from svdllm_plugin import SVDLLMModifier

    parts = set(filter(None, variant.split("+")))
    if "best" in parts:
        parts |= {"fisher", "update", "intra"}
    sigma = next((p for p in ("u", "v", "split") if p in parts), "split")
    settings = dict(update="output") if "output" in parts else {}
    if "update" in parts:
        settings["update"] = "input"
    if "fisher" in parts:
        settings.update(row_weighting="fisher", fisher_batches=fisher_batches)
    if "intra" in parts:
        settings["intra_layer"] = True
    settings["rotation"] = "random" if "rot" in parts else "none"  # GPTQ runs in its own oneshot
    return SVDLLMModifier(ratio=ratio, rank_multiple=multiple, sigma=sigma, **settings)


def quantize(bench, model, bits: int, variant: str):
    """GPTQ every Linear (the factors) in one pass, or with ``qa`` in the variant: GPTQ svd_v with
    FactorRefitModifier in one sequential pass, then GPTQ svd_u on Q(W_v) X."""
    from svdllm_plugin.modifiers.svd import FactorRefitModifier

    if "qa" not in variant.split("+"):
        return run_recipe(bench, [gptq(bits)], model=model)
    model, first = run_recipe(
        bench, [gptq(bits, "re:.*svd_v$"), FactorRefitModifier()], model=model, pipeline="sequential"
    )
    model, second = run_recipe(bench, [gptq(bits, "re:.*svd_u$")], model=model)
    return model, first + second


def checkpoint_bytes(model, tokenizer) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, Path(tmp) / "ckpt", tokenizer)
        return sum(f.stat().st_size for f in (Path(tmp) / "ckpt").glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--gptq-bits", type=int, nargs="*", default=[8, 4, 3, 2])
    parser.add_argument(
        "--svd",
        nargs="*",
        default=["0.2:4:v+rot", "0.2:3:v+rot", "0.4:4:v+rot"],
        help="RATIO:BITS[:VARIANT] points of SVD-LLM followed by GPTQ; VARIANT '+'-joins output, "
        "split|u|v (sigma placement), rot (random rotation of the rank space) and qa "
        "(quantization-aware two-pass GPTQ with W_u refit)",
    )
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--name", default="frontier")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense fp32 row")
    parser.add_argument(
        "--points",
        nargs="*",
        default=None,
        help="the honest frontier (stack_points.py): bf16 checkpoints, bits per decoder-Linear weight, "
        "validation and test perplexities in and out of domain; e.g. W4 Q+W3 S0.2b+W4 W2+C32",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the table, the choice on validation and the plot from results/NAME.json (the points "
        "that finished) without running anything",
    )
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        return report_honest(saved["rows"], saved["args"], args.name)

    bench = setup(args.model, args.num_samples, args.seq_len, args.eval_windows)
    if args.points is not None:
        return honest(bench, args)
    rows = []
    if not args.no_dense:
        rows.append(
            dict(
                point="dense fp32",
                bits=32,
                ratio=0.0,
                ppl=bench.ppl(bench.model),
                ppl_other=bench.ppl_other(bench.model),
                bytes=checkpoint_bytes(bench.model, bench.tokenizer),
                seconds=0.0,
            )
        )

    def add(row):
        rows.append(row)
        print(markdown(rows[-1:], list(rows[-1])), flush=True)
        save(args.name, dict(args=vars(args), rows=rows))

    for bits in args.gptq_bits:
        model, seconds = run_recipe(bench, [gptq(bits)])
        add(
            dict(
                point=f"GPTQ W{bits}",
                bits=bits,
                ratio=0.0,
                ppl=bench.ppl(model),
                ppl_other=bench.ppl_other(model),
                bytes=checkpoint_bytes(model, bench.tokenizer),
                seconds=seconds,
            )
        )
        del model
    svd_only: dict[tuple, tuple] = {}
    for point in args.svd:
        ratio, bits, *rest = point.split(":")
        ratio, bits, variant = float(ratio), int(bits), (rest[0] if rest else "")
        modifier = svd(ratio, variant=variant, fisher_batches=args.num_samples)
        model, seconds = run_recipe(bench, modifier, propagate_error=modifier.propagates)
        # sigma placement does not change W_u W_v
        key = (ratio, modifier.sigma, modifier.update, modifier.row_weighting, modifier.intra_layer)
        if key not in svd_only:
            svd_only[key] = (bench.ppl(model), bench.ppl_other(model), modifier.achieved_ratio)
        svd_ppl, svd_other, achieved = svd_only[key]
        model, quant_seconds = quantize(bench, model, bits, variant)
        ppl = bench.ppl(model)
        add(
            dict(
                point=f"SVD {ratio:.1f}{' ' + variant if variant else ''} + W{bits}",
                bits=bits,
                ratio=ratio,
                achieved_ratio=achieved,
                svd_ppl=svd_ppl,
                svd_ppl_other=svd_other,
                ppl=ppl,
                ppl_other=bench.ppl_other(model),
                x_svd=ppl / svd_ppl,
                bytes=checkpoint_bytes(model, bench.tokenizer),
                seconds=seconds + quant_seconds,
            )
        )
        del model
    for row in rows:
        row["MB"] = row["bytes"] / 1e6
    table = markdown(
        rows,
        ["point", "ratio", "achieved_ratio", "bits", "MB", "svd_ppl", "ppl", "x_svd", "ppl_other", "seconds"],
    )
    print(table)
    save(args.name, dict(args=vars(args), rows=rows)).with_suffix(".md").write_text(table + "\n")
    plot(rows, args.name)


HONEST_COLUMNS = ["point", "bits", "MB", "ppl_val", "ppl_test", "ppl_other_val", "ppl_other_test", "seconds"]


def honest(bench, args) -> None:
    """One process, one calibration set, every point of ``--points`` (and the dense bf16 model)."""
    from stack_points import held_out, measure, run_point

    windows = held_out(bench, count=args.eval_windows)
    rows = []
    if not args.no_dense:
        rows.append(dict(point="dense", name="dense bf16", family="dense", wbits=16, ratio=0.0, seconds=0.0))
        rows[-1].update(measure(bench.model, bench.tokenizer, windows))
        print(markdown(rows, HONEST_COLUMNS), flush=True)
    for spec in args.points:
        try:
            rows.append(run_point(bench, spec, windows, run_recipe))
        except Exception as error:  # noqa: BLE001  (a point that cannot run is reported, not fatal)
            rows.append(dict(point=spec, error=str(error).splitlines()[0][:200]))
        print(markdown(rows[-1:], HONEST_COLUMNS + ["error"]), flush=True)
        save(args.name, dict(args=vars(args), rows=rows))
    report_honest(rows, vars(args), args.name)


def report_honest(rows: list[dict], args: dict, name: str) -> None:
    """The table of every point, the stack chosen on validation for each GPTQ point, the plot."""
    table = markdown(rows, HONEST_COLUMNS + (["error"] if any("error" in r for r in rows) else []))
    picks = select_on_validation(rows)
    chosen = markdown(picks, SELECT_COLUMNS)
    print(table + "\n\n" + chosen)
    save(name, dict(args=args, rows=rows, selection=picks)).with_suffix(".md").write_text(
        table + "\n\nChosen on validation, reported on test:\n\n" + chosen + "\n"
    )
    plot_honest([r for r in rows if "error" not in r], picks, name)


SELECT_COLUMNS = [
    "budget",
    "budget_MB",
    "budget_test",
    "budget_other_test",
    "tried",
    "chosen",
    "MB",
    "bits",
    "val",
    "test",
    "other_test",
    "wins",
]


def plot_honest(rows: list[dict], picks: list[dict], name: str) -> None:
    """bits per decoder-Linear weight vs test perplexity, in domain (left) and out (right); a red ring
    on a GPTQ point that the stack chosen on validation at no more bytes beats on test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["point"] != "dense" and r["ppl_test"] < 1e4]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    families = sorted({r["family"] for r in rows}, key=lambda f: (f != "GPTQ", f))
    for ax, key, pick_key, title in zip(
        axes, ("ppl_test", "ppl_other_test"), ("test", "other_test"), ("calibration domain", "other domain")
    ):
        for fam, marker in zip(families, "o^sDvP*X"):
            pts = sorted((r["bits"], r[key]) for r in rows if r["family"] == fam)
            ax.plot(*zip(*pts), marker, label=fam)
        for r in rows:
            ax.annotate(
                point_label(r), (r["bits"], r[key]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
        for p in picks:
            base = next(r for r in rows if point_label(r) == p["budget"]) if p["budget_test"] < 1e4 else None
            if base is not None and p.get("chosen") and p[pick_key] < p["budget_" + pick_key]:
                ax.plot([base["bits"]], [base[key]], "o", mfc="none", mec="red", ms=12)
        ax.set_yscale("log")
        ax.set_xlabel("bits per decoder-Linear weight (everything counted)")
        ax.set_ylabel(f"test perplexity, {title} (log)")
    axes[0].set_title("SmolLM2-135M (red ring: the stack chosen on validation beats this GPTQ point)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


def plot(rows: list[dict], name: str = "frontier") -> None:
    """Size vs perplexity on the calibration's domain (left) and another domain (right); points
    above 1e4 (collapsed) and the dense fp32 model are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["bits"] < 32 and r["ppl"] < 1e4]
    panels = [("ppl", "held-out perplexity, calibration domain (log)")]
    if all(r.get("ppl_other") is not None for r in rows):
        panels.append(("ppl_other", "perplexity, other domain (log)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    series = [
        ("GPTQ only", lambda r: r["ratio"] == 0, "o"),
        ("SVD-LLM + GPTQ", lambda r: r["ratio"] > 0 and "best" not in r["point"], "s"),
        ("best SVD (Fisher + update + intra) + GPTQ", lambda r: r["ratio"] > 0 and "best" in r["point"], "D"),
    ]
    for ax, (key, label) in zip(axes[0], panels):
        for legend, pick, marker in series:
            pts = sorted((r["MB"], r[key]) for r in rows if pick(r))
            if pts:
                ax.plot(*zip(*pts), marker, label=legend)
        for r in rows:
            short = r["point"].replace(" v+rot", "").replace("+best", " best")
            ax.annotate(short, (r["MB"], r[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("checkpoint size on disk (MB, embeddings fp32 in all)")
        ax.set_ylabel(label)
    axes[0][0].set_title("SmolLM2-135M: size / quality frontier")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
