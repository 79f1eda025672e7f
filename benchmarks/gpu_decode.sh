#!/usr/bin/env bash
# Decode and prefill of random-weight LLaMA-2-7B shapes on one GPU: dense against factorized.
#
#   bash benchmarks/gpu_decode.sh [OUT_DIR]        # from the repository root
#
# Needs python3 with torch, transformers (and triton for the graph-kernel regime) only: no
# install of the plugin, llmcompressor, compressed-tensors or pydantic (loguru is shimmed when
# missing). Steps run in priority order, each under its own timeout, so a short GPU lease still
# returns the first tables: (1) the acceptance figures, ratio 0.4, batch 1, eager vs graph,
# prefill 16 x 512; (2) the fused and kernel regimes; (3) all ratios at batch 1 and 16;
# (4) the latent KV cache at 4k-32k contexts. Each step writes NAME.json, NAME.png and NAME.err
# under OUT_DIR (default $OUT, else benchmarks/results/gpu_decode) and prints its table.
# Environment: SHAPE (llama-7b), PYTHON (python3), STEP_TIMEOUT seconds (420),
# BACKEND (inductor; cudagraph = capture by hand, no compile time), STEPS (1234), DEVICE (cuda),
# EXTRA (more bench flags). A CPU smoke test of the script itself:
#   SHAPE=cfg.json DEVICE=cpu BACKEND=eager EXTRA="--rank-multiple 8" STEPS=1 bash benchmarks/gpu_decode.sh /tmp/out
set -uo pipefail
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu_decode}}
PY=${PYTHON:-python3}
SHAPE=${SHAPE:-llama-7b}
BACKEND=${BACKEND:-inductor}
STEPS=${STEPS:-1234}
DEVICE=${DEVICE:-cuda}
read -r -a EXTRA_ARGS <<<"${EXTRA:-}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import loguru" 2>/dev/null || export PYTHONPATH="$PWD/benchmarks/gpu_shim:$PYTHONPATH"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/svdllm_inductor}  # shared by the steps
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

step() {  # step NAME ARGS...: one `svdllm bench --synthetic` run, then its table
    local name=$1
    shift
    local cmd=(-m svdllm_plugin.cli bench --synthetic "$SHAPE" --device "$DEVICE" --dtype bf16
        --compile-backend "$BACKEND" --json --plot "$OUT_DIR/$name.png" "$@" "${EXTRA_ARGS[@]}")
    echo
    echo "== $name: svdllm ${cmd[*]:2}"
    local start=$SECONDS
    timeout "${STEP_TIMEOUT:-420}" "$PY" "${cmd[@]}" >"$OUT_DIR/$name.json" 2>"$OUT_DIR/$name.err"
    local rc=$?
    echo "-- exit $rc after $((SECONDS - start)) s"
    if [ $rc -eq 0 ]; then
        $PY -c "import json, sys; from svdllm_plugin.bench.decode_output import format_rows; print(format_rows(json.load(open(sys.argv[1]))))" "$OUT_DIR/$name.json"
    else
        tail -5 "$OUT_DIR/$name.err"
    fi
}

[[ $STEPS == *1* ]] && step accept --ratios 0.4 --decode eager,graph --batches 1 --contexts 1024 \
    --prefill 16x512 --decode-tokens 32 --repeats 5
[[ $STEPS == *2* ]] && $PY - <<'PY'  # the Triton kernel against two GEMMs, before timing it
import torch
from svdllm_plugin.inference.triton_lowrank import available, lowrank_linear
if available():
    for m, k, n in [(4096, 1216, 4096), (11008, 1856, 4096), (576, 200, 1536)]:
        for tokens in (1, 16):
            V = (torch.randn(k, n, device="cuda") / n**0.5).bfloat16()
            U = (torch.randn(m, k, device="cuda") / k**0.5).bfloat16()
            x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
            ref = (x.float() @ V.float().T) @ U.float().T
            err = (lowrank_linear(x, V, U).float() - ref).abs().max().item()
            print(f"kernel {m}x{k}x{n}, {tokens} rows: max |error| {err:.4f} (|ref| max {ref.abs().max().item():.2f})")
else:
    print("kernel check skipped: no CUDA or no Triton")
PY
[[ $STEPS == *2* ]] && step kernels --ratios 0.4 --decode graph,graph-fused,graph-kernel --batches 1,16 \
    --contexts 1024 --prefill "" --decode-tokens 32 --repeats 5
[[ $STEPS == *3* ]] && step ratios --ratios 0.2,0.4,0.6 --decode eager,graph --batches 1,16 --contexts 1024 \
    --prefill 16x512 --decode-tokens 32 --repeats 5
[[ $STEPS == *4* ]] && step latent --ratios 0.4 --decode eager,latent --batches 1 --contexts 4096,16384,32768 \
    --prefill "" --decode-tokens 8 --repeats 3
exit 0
