#!/usr/bin/env bash
# The one prepared GPU run (issues 4, 8 and 12), sized for at most ~8 minutes on one H100/H200, in priority order:
#   1. correctness of every CUDA backend (triton, flex, tiled, offset; SAN aggregation triton, offset) against the
#      float64 references, forward and backward, float32/bfloat16/float16. FAIL-FAST: a failing check stops the
#      run here with "CORRECTNESS FAILED" and exit 1, before anything is timed;
#   2. the op timings: attention fwd+bwd B=64 C=64 56x56 triton vs tiled (target <= 0.3x), SAN aggregation triton
#      vs offset, then `acmix bench op` on the ResNet shapes (every backend);
#   3. the model table of the issue-12 targets (batch 64, 224^2, bf16 autocast, channels_last, train and inference,
#      peak memory): ACmix-ResNet-50/26, SAN-10, Swin-T, PVT-T beside their baselines, the 'acmix' variant on
#      triton (attention and SAN aggregation) and an 'acmix-tiled' variant in the same interleaved run;
#   4. with the time left: one whole-model torch.compile comparison (ResNet-26 train), the GPU-marked tests and the
#      triton test module natively on CUDA.
# Writes gpu_check_<tag>.json, gpu_ops_<tag>.csv/.png, gpu_models_<tag>.csv/.json/.png (+ logs) into $OUT
# (default docs/results). Run from the repository root:  bash benchmarks/gpu_all.sh
# DRY=1 runs every step on the CPU with tiny shapes (checks the script itself; add TRITON_INTERPRET=1 for triton).
set -u
OUT=${OUT:-docs/results}
BUDGET=${BUDGET:-470}  # seconds for the whole script
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
CHECK_ARGS=() MODEL_ARGS=() MODELS=(acmix_resnet50 acmix_resnet26 acmix_san10 acmix_swin_tiny_patch4_window7_224 acmix_pvt_tiny)
if [ "${DRY:-0}" = 1 ]; then
  CHECK_ARGS=(--device cpu --quick --repeats 2)
  MODEL_ARGS=(--device cpu --batch 2 --resolution 32 --dtype float32 --memory-format contiguous --warmup 1 --repeats 1
    --steps-per-repeat 1)
  MODELS=(acmix_resnet26)
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
TAG=$(python3 - <<'PY'
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
m = re.search(r"([A-Z]\d{2,4})", name)
print((m.group(1) if m else re.sub(r"\W+", "_", name)).lower())
PY
)
python3 - <<'PY' 2>&1 | tee "$OUT/gpu_env_$TAG.txt"
import torch, timm, acmix
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
print("torch", torch.__version__, "timm", timm.__version__, "triton", tv, "acmix", acmix.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
python3 -m acmix info 2>&1 | tail -40 >> "$OUT/gpu_env_$TAG.txt"

echo "== 1. correctness (fail-fast)  [$(left) s left]"
timeout 200 python3 benchmarks/gpu_check.py "${CHECK_ARGS[@]}" --correctness-only --budget 180 --json "$OUT/gpu_check_$TAG.json" \
  2>&1 | tee "$OUT/gpu_check_$TAG.txt" | grep -v "^  .* ok fwd"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "CORRECTNESS FAILED (gpu_check.py exit $rc): see $OUT/gpu_check_$TAG.txt; nothing was timed"
  exit 1
fi

echo "== 2. op timings  [$(left) s left]"
timeout 130 python3 benchmarks/gpu_check.py "${CHECK_ARGS[@]}" --skip-correctness --budget 110 --json "$OUT/gpu_ops_$TAG.json" \
  --csv "$OUT/gpu_ops_$TAG.csv" --plot "$OUT/gpu_ops_$TAG.png" 2>&1 | tail -70 | tee "$OUT/gpu_ops_$TAG.txt"

echo "== 3. model table  [$(left) s left]"
T=$(($(left) - 20)); [ "$T" -gt 240 ] && T=240
BACKENDS=(--backend triton --aggregate-backend triton --extra-backend tiled)
[ "${DRY:-0}" = 1 ] && [ "${TRITON_INTERPRET:-0}" != 1 ] && BACKENDS=(--extra-backend offset)
timeout "$T" python3 benchmarks/gpu_models.py "${MODELS[@]}" "${MODEL_ARGS[@]}" "${BACKENDS[@]}" --budget-s $((T - 45)) --out "$OUT" --prefix "gpu_models_$TAG" \
  2>"$OUT/gpu_models_$TAG.log" | tee "$OUT/gpu_models_$TAG.txt"

if [ "$(left)" -gt 100 ] && [ "${DRY:-0}" != 1 ]; then
  echo "== 4a. torch.compile: ResNet-26 train  [$(left) s left]"
  timeout $(($(left) - 30)) python3 benchmarks/gpu_models.py acmix_resnet26 "${MODEL_ARGS[@]}" --compile --mode train \
    "${BACKENDS[@]::2}" --budget-s 1 --out "$OUT" --prefix "gpu_models_compile_$TAG" 2>"$OUT/gpu_models_compile_$TAG.log" \
    | tee "$OUT/gpu_models_compile_$TAG.txt"
fi
if [ "$(left)" -gt 40 ] && [ "${DRY:-0}" != 1 ]; then
  echo "== 4b. triton test module on CUDA, then the GPU-marked tests  [$(left) s left]"
  timeout $(($(left) - 5)) python3 -m pytest -q -p no:cacheprovider -x tests/test_triton_backend.py \
    2>&1 | tail -15 | tee "$OUT/gpu_tests_$TAG.txt"
  [ "$(left)" -gt 30 ] && timeout $(($(left) - 5)) python3 -m pytest -q -p no:cacheprovider -x -m gpu \
    tests/test_backends.py tests/test_train_cli.py 2>&1 | tail -15 | tee -a "$OUT/gpu_tests_$TAG.txt"
fi
echo "== done in $(($(date +%s) - START)) s; files in $OUT:"
ls "$OUT" | grep "_$TAG" | tr '\n' ' '
echo
