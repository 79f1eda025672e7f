"""Size / quality frontier: dense GPTQ at 8/4/3/2 bits versus SVD-LLM ratios x GPTQ bits.

    .venv/bin/python benchmarks/frontier.py [--gptq-bits 8 4 3 2] [--svd 0.2:4 0.4:4 ...]

Every point is a real packed checkpoint (compressed-tensors pack-quantized) written with
the plugin's save_pretrained; its size is the bytes of its safetensors files on disk.
Non-quantized tensors (embeddings, norms) stay float32 in every checkpoint, the same for
all points. Writes benchmarks/results/frontier.{json,md,png}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import RESULTS, markdown, run_recipe, save, setup

from svdllm_plugin.checkpoint import save_pretrained


def gptq(bits: int, targets: str = "Linear", group_size: int = 64):
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = dict(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    return GPTQModifier(
        config_groups={"group_0": dict(targets=[targets], weights=weights)}, ignore=["re:.*lm_head"]
    )


def svd(ratio: float, multiple: int = 64):
    from svdllm_plugin import SVDLLMModifier

    return SVDLLMModifier(ratio=ratio, rank_multiple=multiple)


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
        default=["0.2:8", "0.2:4", "0.4:4", "0.2:3"],
        help="RATIO:BITS points of SVD-LLM followed by GPTQ",
    )
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    args = parser.parse_args()

    bench = setup(args.model, args.num_samples, args.seq_len, args.eval_windows)
    rows = [
        dict(
            point="dense fp32",
            bits=32,
            ratio=0.0,
            ppl=bench.ppl(bench.model),
            bytes=checkpoint_bytes(bench.model, bench.tokenizer),
            seconds=0.0,
        )
    ]
    points = [(0.0, b) for b in args.gptq_bits] + [tuple(map(float, p.split(":"))) for p in args.svd]
    for ratio, bits in points:
        bits = int(bits)
        recipe = [gptq(bits)] if ratio == 0 else [svd(ratio), gptq(bits)]
        model, seconds = run_recipe(bench, recipe)
        name = f"GPTQ W{bits}" if ratio == 0 else f"SVD {ratio:.1f} + W{bits}"
        rows.append(
            dict(
                point=name,
                bits=bits,
                ratio=ratio,
                ppl=bench.ppl(model),
                bytes=checkpoint_bytes(model, bench.tokenizer),
                seconds=seconds,
            )
        )
        print(markdown(rows[-1:], list(rows[-1])), flush=True)
        save("frontier", dict(args=vars(args), rows=rows))
        del model
    for row in rows:
        row["MB"] = row["bytes"] / 1e6
    table = markdown(rows, ["point", "ratio", "bits", "MB", "ppl", "seconds"])
    print(table)
    save("frontier", dict(args=vars(args), rows=rows)).with_suffix(".md").write_text(table + "\n")
    plot(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pick, style in [
        ("GPTQ only", lambda r: r["ratio"] == 0, "o-"),
        ("SVD-LLM + GPTQ", lambda r: r["ratio"] > 0, "s--"),
    ]:
        pts = sorted((r["MB"], r["ppl"]) for r in rows if pick(r) and r["bits"] < 32)
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    for r in rows:
        ax.annotate(r["point"], (r["MB"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint size on disk (MB, embeddings fp32 in all)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M: size / quality frontier")
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "frontier.png", dpi=120)


if __name__ == "__main__":
    main()
