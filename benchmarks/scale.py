"""Scaling benchmark: real layer shapes through the real pipeline (oneshot) with disk offload.

Random-weight Llama-architecture models with the shapes of Llama-2-7B (hidden 4096,
intermediate 11008), 13B (5120 / 13824) or 70B (8192 / 28672, grouped-query attention) and a
small vocabulary, N decoder layers, saved once in float32; each run loads one with its
decoder layers offloaded to DISK (compressed-tensors ``load_offloaded_model``) and compresses
it with ``oneshot`` in a subprocess of its own, so its peak RSS is its own. ``smollm2`` is the
real SmolLM2-135M, in full.

Per decoder layer: wall time between the ends of consecutive layers, split into
decomposition (whitening + SVD + writes, from the modifier's records), statistics (the X X^T
hooks) and forward (the rest: two passes through the layer, onloading from disk); the peak
bytes of X X^T statistics held, against the formula (3 h^2 + i^2) x 8 (x2 with the
closed-form update's original statistics).

    nice -n 10 .venv/bin/python benchmarks/scale.py --runs 7b:2:uniform 7b:4:uniform
    .venv/bin/python benchmarks/scale.py --report      # table of benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(os.environ.get("SVDLLM_SCALE_DIR", Path(tempfile.gettempdir()) / "svdllm_scale"))
SHAPES = {  # hidden, intermediate, heads, kv heads (Llama-2 7B / 13B, Llama-2/3 70B)
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
    "70b": (8192, 28672, 64, 8),
    "7b-quarter": (1024, 2752, 8, 8),  # Llama-2-7B with every width divided by 4 (a quick series)
    "mini": (512, 1376, 8, 8),  # a smoke test of the script
}
FULL_LAYERS = {"7b": 32, "13b": 40, "70b": 80}
OPTIONS = {
    "uniform": {},
    "loss": {"allocation": "loss"},
    "sensitivity": {"allocation": "sensitivity", "sensitivity_batches": 1, "sensitivity_ratios": [0.4]},
    "closed_form_update": {"closed_form_update": True},
    "fisher": {"row_weighting": "fisher"},  # FWSVD's layer-wise gradient pass before calibration
}
VOCAB = 1024


def model_dir(shape: str, layers: int) -> Path:
    return WORK / f"{shape}-{layers}L"


def make_model(shape: str, layers: int) -> Path:
    """A random-weight float32 Llama of this shape, saved once (its own process: its memory is freed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = model_dir(shape, layers)
    if (folder / "config.json").exists():
        return folder
    hidden, inter, heads, kv = SHAPES[shape]
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def child(spec: dict) -> dict:
    """One compression in this process; returns the measurements."""
    import torch

    torch.set_num_threads(spec["threads"])
    from compressed_tensors.offload import load_offloaded_model
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import svdllm_plugin  # noqa: F401
    from svdllm_plugin.models import resolve_model_path
    from svdllm_plugin.modifiers.svd import SVDLLMModifier
    from svdllm_plugin.modifiers.svd.statistics import StatisticsCollector

    timing = _instrument(SVDLLMModifier, StatisticsCollector)
    smol = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(smol)
    folder = smol if spec["shape"] == "smollm2" else str(model_dir(spec["shape"], spec["layers"]))
    offload = tempfile.mkdtemp(prefix="offload-", dir=WORK)
    device_map = {n: "cpu" for n in ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")}
    device_map["model.layers"] = "disk"
    start = time.perf_counter()
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=offload)
    load_s = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if spec["shape"] != "smollm2" else len(tokenizer)
    ids = torch.randint(0, vocab, (spec["samples"], spec["seq_len"]), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    modifier = SVDLLMModifier(ratio=0.4, **OPTIONS[spec["option"]])
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=data,
        recipe=modifier,
        num_calibration_samples=spec["samples"],
        max_seq_length=spec["seq_len"],
    )
    total_s = time.perf_counter() - start
    shutil.rmtree(offload, ignore_errors=True)
    layers = _per_layer(timing, modifier.records)
    return dict(
        spec,
        load_s=load_s,
        total_s=total_s,
        per_layer=layers,
        modules=len(modifier.records),
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        peak_stats_gib=timing["peak_stats"] / 2**30,
    )


def _instrument(modifier_cls, collector_cls) -> dict:
    """Time the statistics hooks, the end of every decoder layer and the statistics held."""
    timing = {"stats_s": 0.0, "ends": [], "stats_at_end": [], "peak_stats": 0}
    call, ready = collector_cls.__call__, modifier_cls._compress_ready

    def timed_call(self, module, args):
        start = time.perf_counter()
        call(self, module, args)
        timing["stats_s"] += time.perf_counter() - start

    def timed_ready(self):
        held = sum(
            s.H.nelement() * s.H.element_size()
            for c in (self._collector, self._original)
            if c is not None
            for s in c.stats.values()
        )
        timing["peak_stats"] = max(timing["peak_stats"], held)
        before = {r["name"] for r in self._records} | set(self._spectra)
        ready(self)
        done = ({r["name"] for r in self._records} | set(self._spectra)) - before
        layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in done})
        timing["ends"].append((time.perf_counter(), timing["stats_s"], layers, time.process_time()))

    collector_cls.__call__, modifier_cls._compress_ready = timed_call, timed_ready
    timing["start"] = None
    return timing


def _per_layer(timing: dict, records: list[dict]) -> list[dict]:
    """Wall time of each decoder layer's turn (end of the previous turn to the end of the turn
    that decomposed it), split into decomposition, statistics and forward (the rest)."""
    decomposition: dict[int, float] = {}
    for r in records:
        index = int(r["name"].split(".layers.")[1].split(".")[0])
        decomposition[index] = decomposition.get(index, 0.0) + r["seconds"]
    out, previous, stats_before, cpu_before = [], timing["start"], 0.0, 0.0
    for end, stats, layers, cpu in timing["ends"]:
        if len(layers) == 1 and previous is not None:
            i = layers[0]
            wall, statistics = end - previous, stats - stats_before
            out.append(
                dict(
                    layer=i,
                    wall_s=wall,
                    statistics_s=statistics,
                    decomposition_s=decomposition[i],
                    forward_s=wall - statistics - decomposition[i],
                    cpu_s=cpu - cpu_before,
                )
            )
        previous, stats_before, cpu_before = end, stats, cpu
    return out  # (layer 0 is left out: its turn also holds the tracing and the cache set-up)


def stats_formula_gib(shape: str, option: str) -> float:
    """Peak X X^T bytes: one decoder layer's distinct inputs (q/k/v, o, gate/up, down) in float64."""
    h, i = SHAPES[shape][:2] if shape in SHAPES else (576, 1536)
    copies = 2 if option == "closed_form_update" else 1
    return copies * (3 * h * h + i * i) * 8 / 2**30


def layer_weights_gib(shape: str, dtype_bytes: int = 4) -> float:
    h, i, heads, kv = SHAPES[shape] if shape in SHAPES else (576, 1536, 9, 3)
    attn = h * h * 2 + 2 * h * (h * kv // heads)
    return (attn + 3 * h * i) * dtype_bytes / 2**30


def run(specs: list[dict], out: Path) -> list[dict]:
    results = json.loads(out.read_text()) if out.exists() else []
    for spec in specs:
        if spec["shape"] != "smollm2":
            make = [sys.executable, __file__, "--make", spec["shape"], str(spec["layers"])]
            subprocess.run(make, check=True)
        print(f"== {spec}", flush=True)
        command = [sys.executable, __file__, "--child", json.dumps(spec)]
        # glibc raises its mmap threshold after large frees, then keeps freed heap pages: peak RSS
        # would grow with the number of matrices decomposed, not with what is alive. A fixed
        # threshold returns every large buffer to the system when freed.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], flush=True)
            continue
        result = dict(json.loads(proc.stdout.strip().splitlines()[-1]), malloc_mmap_threshold=1 << 20)
        results = [r for r in results if _key(r) != _key(result)] + [result]
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "per_layer"}), flush=True)
    return results


def _key(r: dict) -> tuple:
    return r["shape"], r["layers"], r["option"], r["samples"], r["seq_len"]


def report(results: list[dict]) -> str:
    import statistics as st

    rows = [
        "| shape | layers | option | peak RSS GiB | per layer wall s (forward / statistics / decomposition) "
        "| per layer CPU s | peak X X^T GiB (formula) | total s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["shape"], r["option"], r["layers"])):
        per = r["per_layer"]
        med = {
            k: st.median(x.get(k, float("nan")) for x in per) if per else float("nan")
            for k in ("wall_s", "forward_s", "statistics_s", "decomposition_s", "cpu_s")
        }
        rows.append(
            f"| {r['shape']} | {r['layers']} | {r['option']} | {r['peak_rss_gib']:.2f} | {med['wall_s']:.1f} "
            f"({med['forward_s']:.1f} / {med['statistics_s']:.1f} / {med['decomposition_s']:.1f}) | "
            f"{med['cpu_s']:.1f} | "
            f"{r['peak_stats_gib']:.3f} ({stats_formula_gib(r['shape'], r['option']):.3f}) | "
            f"{r['total_s']:.0f} |"
        )
    rows += [
        "",
        "| shape | option | RSS(4 layers) - RSS(2 layers) GiB | one layer's weights + X X^T GiB |",
        "|---|---|---|---|",
    ]
    by = {(r["shape"], r["option"], r["layers"]): r for r in results}
    for (shape, option, layers), r in sorted(by.items()):
        other = by.get((shape, option, 2))
        if layers == 4 and other:
            bound = layer_weights_gib(shape) + stats_formula_gib(shape, option)
            delta = r["peak_rss_gib"] - other["peak_rss_gib"]
            rows.append(f"| {shape} | {option} | {delta:+.2f} | {bound:.2f} |")
    return "\n".join(rows)


def extrapolate(results: list[dict], source: str = "7b-quarter") -> str:
    """Full-model estimates from the per-layer medians of ``source`` runs (CPU, this machine).

    Per decoder layer at fixed calibration tokens: forward and statistics scale with the weights
    (x (h'/h)^2), the decompositions with n^3 (x (h'/h)^3). Memory beyond the model: one decoder
    layer in float32, its X X^T, one float64 decomposition of the largest matrix.
    """
    import statistics as st

    rows = [
        "| model | option | layers | est. hours, 1 CPU core | X X^T GiB | layer fp32 GiB "
        "| largest decomposition GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    h0 = SHAPES[source][0]
    runs = [r for r in results if r["shape"] == source and r["per_layer"]]
    deepest = {r["option"]: max(x["layers"] for x in runs if x["option"] == r["option"]) for r in runs}
    for r in sorted(runs, key=lambda r: r["option"]):
        if r["layers"] != deepest[r["option"]]:
            continue
        keys = ("forward_s", "statistics_s", "decomposition_s")
        med = {k: st.median(x[k] * _cpu_share(x) for x in r["per_layer"]) for k in keys}
        for shape in ("7b", "13b", "70b"):
            h, i = SHAPES[shape][:2]
            scale = h / h0
            streaming = med["forward_s"] + med["statistics_s"]
            per_layer = streaming * scale**2 + med["decomposition_s"] * scale**3
            hours = per_layer * FULL_LAYERS[shape] / 3600
            decomposition = 8 * (i * i + 3 * h * i) / 2**30
            rows.append(
                f"| {shape} | {r['option']} | {FULL_LAYERS[shape]} | {hours:.1f} | "
                f"{stats_formula_gib(shape, r['option']):.2f} | {layer_weights_gib(shape):.2f} | "
                f"{decomposition:.2f} |"
            )
    return "\n".join(rows)


def probe_matrix(m: int, n: int) -> dict:
    """CPU seconds of one whitening decomposition of an (m, n) matrix (float64, this process)."""
    import torch

    from svdllm_plugin.modifiers.svd.decompose import factorize, rank_for_ratio, whiten_cholesky

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=g) * 0.02
    X = torch.randn(n, 64, generator=g, dtype=torch.float64)
    H = X @ X.T / 64 + torch.eye(n, dtype=torch.float64)  # (n, n) positive definite, cheap to build
    start = time.process_time()
    S = whiten_cholesky(H)
    whitening = time.process_time() - start
    factorize(W, rank_for_ratio(m, n, 0.4), S)
    return dict(m=m, n=n, whitening_cpu_s=whitening, total_cpu_s=time.process_time() - start)


def _cpu_share(layer: dict) -> float:
    """CPU seconds per wall second of a layer's turn (the machine is shared: wall > CPU time)."""
    return layer["cpu_s"] / layer["wall_s"] if "cpu_s" in layer else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="*", default=[], help="shape:layers:option, e.g. 7b:2:uniform")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)  # 2 threads crawl on a busy 2-core machine
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--make", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--probe-matrix",
        nargs=2,
        type=int,
        metavar=("M", "N"),
        help="CPU seconds of one float64 whitening decomposition of an M x N matrix",
    )
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.make:
        make_model(args.make[0], int(args.make[1]))
        return
    if args.probe_matrix:
        print(json.dumps(probe_matrix(*args.probe_matrix)))
        return
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    specs = []
    for text in args.runs:
        shape, layers, option = text.split(":")
        specs.append(
            dict(
                shape=shape,
                layers=int(layers),
                option=option,
                samples=args.samples,
                seq_len=args.seq_len,
                threads=args.threads,
            )
        )
    results = run(specs, args.out) if specs else json.loads(args.out.read_text())
    print(report(results))
    print()
    print(extrapolate(results))


if __name__ == "__main__":
    main()
