"""End-to-end serving check of svdllm-plugin folders in vLLM (run with the SERVING venv's python).

    python integrations/vllm/check.py reference FOLDER OUT.json       # stock transformers, greedy
    python integrations/vllm/check.py serve FOLDER OUT.json --impl native|transformers [--tp 2]
    python integrations/vllm/check.py bench FOLDER:IMPL[,FOLDER:IMPL...] OUT.json [--batches 1 32]
    python integrations/vllm/check.py compare REF.json SERVED.json     # exit 1 unless tokens equal
    python integrations/vllm/check.py tiny TOKENIZER_FOLDER OUT_FOLDER  # a Llama whose heads split by 2

Each vLLM run is its own process (one ``LLM`` per process). fp32 throughout; greedy (temperature
0), ``NEW_TOKENS`` tokens per prompt, end-of-sequence ignored on both sides so that the token
lists have the same length.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village,",
]
NEW_TOKENS = 16


def reference(folder: str) -> dict:
    """Greedy tokens of stock transformers (the folder's own remote code), one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokens = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out, cache = [], None
            step = ids
            for _ in range(NEW_TOKENS):  # plain greedy: no stopping, no logits processors
                result = model(step, past_key_values=cache, use_cache=True)
                cache = result.past_key_values
                step = result.logits[:, -1:].argmax(-1)
                out.append(int(step))
            tokens.append(out)
    return {"tokens": tokens, "prompts": PROMPTS}


def tiny(tokenizer_folder: str, out: str) -> dict:
    """A small random Llama for tensor parallel 2 (SmolLM2's 9 heads do not split by 2).

    Hidden 256, 8 heads / 4 KV heads (head_dim 32), intermediate 512, 4 layers, tied embeddings,
    the tokenizer (and vocabulary) of ``tokenizer_folder`` so that the prompts tokenize; fp32.
    Compress it with ``svdllm compress --model OUT_FOLDER`` like any HF folder.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"folder": out, "parameters": sum(p.numel() for p in model.parameters())}


def _llm(folder: str, impl: str, tp: int):
    from vllm import LLM

    kwargs = {"model_impl": impl} if impl == "transformers" else {}
    if tp == 1:  # engine and worker in this process: one vLLM import instead of three
        kwargs["distributed_executor_backend"] = "uni"
    return LLM(
        model=folder,
        trust_remote_code=True,
        dtype="float32",
        tensor_parallel_size=tp,
        max_model_len=min(1024, _max_positions(folder)),
        seed=0,
        # on CPU the fraction of the machine's memory reserved (model + KV cache): the default 0.92
        # fails on a shared machine
        gpu_memory_utilization=float(os.environ.get("SVDLLM_VLLM_MEMORY", "0.15")),
        # SVDLLM_VLLM_EAGER=0 keeps vLLM's default torch.compile; its CPU warm-up did not finish in
        # 8 minutes on the 2-core machine these checks were written on
        enforce_eager=os.environ.get("SVDLLM_VLLM_EAGER", "1") == "1",
        **kwargs,
    )


def _bind_threads(tp: int) -> None:
    """One core group per tensor-parallel rank: vLLM's CPU default (``auto``) binds each rank to its
    own NUMA node and refuses TP 2 on a one-node machine ("Not enough allowed NUMA nodes")."""
    if tp == 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < tp:
        raise SystemExit(f"--tp {tp} needs at least {tp} CPU cores; this process may use {len(cpus)}")
    share = len(cpus) // tp
    groups = [cpus[rank * share : (rank + 1) * share] for rank in range(tp)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, g)) for g in groups)


def _max_positions(folder: str) -> int:
    config = json.loads((Path(folder) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 1024)


def serve_all(folder: str, impls: list[str], tp: int) -> dict:
    """One vLLM per implementation, in turn, in this process."""
    results = {}
    for impl in impls:
        results[impl] = serve(folder, impl, tp)
        gc.collect()
    return results


def serve(folder: str, impl: str, tp: int) -> dict:
    from vllm import SamplingParams

    start = time.perf_counter()
    try:
        llm = _llm(folder, impl, tp)
    except Exception as error:  # a refusal is a result (packed folders on a device without a kernel)
        return {"refused": f"{type(error).__name__}: {str(error)[:1000]}"}  # as raised: one line or not
    load_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    model_class = _model_class(llm)
    _shutdown(llm)
    return {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "load_s": round(load_s, 1),
        "impl": impl,
        "tp": tp,
        "model_class": model_class,
    }


def _shutdown(llm) -> None:
    """Free the engine (its KV cache) before the next one is built in this process."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except AttributeError:
        pass


def _model_class(llm) -> str | None:
    try:
        return llm.llm_engine.model_config.architecture  # the class vLLM resolved
    except AttributeError:
        return None


def bench(specs: list[str], batches: list[int], prompt_len: int, decode_tokens: int, rounds: int) -> dict:
    """Tokens/s of prefill and decode for each ``FOLDER:IMPL`` spec, per batch size, ``rounds``
    times with the specs alternating (the machine is shared: compare ratios within a round).

    Prefill: ``prompt_len``-token prompts, one output token. Decode: ``decode_tokens`` output
    tokens after an 8-token prompt, the time of that prompt's one-token run subtracted.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    results: dict = {spec: [] for spec in specs}
    for _ in range(rounds):
        for spec in specs:
            folder, _, impl = spec.rpartition(":")
            llm = _llm(folder, impl, 1)
            vocab = llm.get_tokenizer().vocab_size
            measured = {"model_class": _model_class(llm)}
            for batch in batches:
                ids = [[(7 * i + 13 * j + 100) % vocab for j in range(prompt_len)] for i in range(batch)]
                prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]
                short = [TokensPrompt(prompt_token_ids=p[:8]) for p in ids]
                llm.generate(prompts[:1], one, use_tqdm=False)  # warm-up
                prefill_s = _timed(llm, prompts, one)
                decode_s = _timed(llm, short, many) - _timed(llm, short, one)
                measured[str(batch)] = {
                    "prefill_tok_s": round(batch * prompt_len / prefill_s, 1),
                    "decode_tok_s": round(batch * (decode_tokens - 1) / decode_s, 1),
                }
            results[spec].append(measured)
            print(spec, json.dumps(measured), flush=True)
            _shutdown(llm)
            del llm
            gc.collect()
    return {"prompt_len": prompt_len, "decode_tokens": decode_tokens, "rounds": results}


def _timed(llm, prompts, params) -> float:
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def compare(ref_path: str, served_path: str) -> int:
    """0: every implementation gave transformers' tokens; 2: some refused (none differ); 1: differ."""
    ref, runs = json.loads(Path(ref_path).read_text()), json.loads(Path(served_path).read_text())
    status = 0
    for impl, served in runs.items():
        name = f"{Path(served_path).name} {impl} (tp {served.get('tp', '?')}, {served.get('model_class')})"
        if "refused" in served:
            print(f"REFUSED {name}: {served['refused']}")
            status = max(status, 2) if status != 1 else 1
            continue
        same = sum(a == b for a, b in zip(ref["tokens"], served["tokens"]))
        verdict = "SAME" if same == len(ref["tokens"]) else "DIFFERENT"
        print(f"{verdict} {name}: {same}/{len(ref['tokens'])} prompts x {NEW_TOKENS} tokens equal")
        for a, b in zip(ref["tokens"], served["tokens"]):
            if a != b:
                print(f"  transformers {a}\n  vllm         {b}")
        status = 1 if verdict != "SAME" else status
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["reference", "serve", "bench", "compare", "tiny"])
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("--impl", choices=["native", "transformers"], nargs="+", default=["native"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "compare":
        return compare(args.folder, args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    if args.command == "tiny":
        result = tiny(args.folder, args.out)
        print(json.dumps(result))
        return 0
    if args.command == "reference":
        result = reference(args.folder)
    elif args.command == "serve":
        _bind_threads(args.tp)
        result = serve_all(args.folder, args.impl, args.tp)
    else:
        result = bench(args.folder.split(","), args.batches, args.prompt_len, args.decode_tokens, args.rounds)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
