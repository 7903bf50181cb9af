#!/usr/bin/env bash
# The CPU measurements of issue 13, in one go (2 threads, fp32), each table one interleaved run in one process:
#   1. `acmix bench op` at the ResNet shapes: attention backends (cpp, tiled, reference), 3x3 conv, the layer's
#      1x1 projections, the whole layer, its official formulation and recompute=True -> layer / projections time,
#      layer / official peak memory;
#   2. `acmix bench model`, training step, batch 8, 224^2: ACmix-ResNet-26, -Swin-T, -PVT-T beside their baselines;
#   3. the same models, inference, batch 1 (a deployed model's latency);
#   4. timm's HaloNet-26t beside ResNet-26t and ACmix-ResNet-26 beside ResNet-26, training step, batch 8, 256^2
#      (the peer ratio the issue aims for).
# Run on a quiet machine (nothing else running) from the repository root: bash benchmarks/cpu_targets.sh
# Writes cpu_op.*, cpu_models_train.*, cpu_models_infer_b1.*, cpu_peer.* (csv/json/log) into $OUT (docs/results).
# QUICK=1 shrinks everything (checks the script itself in a minute).
set -eu
OUT=${OUT:-docs/results}
ACMIX=${ACMIX:-acmix}
mkdir -p "$OUT"
OP=(--shapes 64x56,128x28,256x14,512x7 --strides 1 2 --batch 8 --repeats 5 --warmup 2)
M=(--threads 2 --warmup 2 --repeats 5)
TRAIN=(--batch 8 --resolution 224)
INFER=(--batch 1 --resolution 224)
PEER=(--batch 8 --resolution 256)
if [ "${QUICK:-0}" = 1 ]; then
  OP=(--shapes 16x8 --strides 1 --batch 1 --repeats 1 --warmup 0)
  M=(--threads 2 --warmup 1 --repeats 1)
  TRAIN=(--batch 1 --resolution 64) INFER=(--batch 1 --resolution 64) PEER=(--batch 1 --resolution 64)
fi
run() { local name=$1; shift; echo "== $name: $*"; "$@" 2>&1 | tee "$OUT/$name.log"; }
run cpu_op "$ACMIX" bench op "${OP[@]}" --threads 2 --backends cpp tiled reference \
  --csv "$OUT/cpu_op.csv" --json "$OUT/cpu_op.json"
MODELS=(acmix_resnet26 acmix_swin_tiny_patch4_window7_224 acmix_pvt_tiny)
run cpu_models_train "$ACMIX" bench model "${MODELS[@]}" --mode train "${TRAIN[@]}" "${M[@]}" --no-reference \
  --csv "$OUT/cpu_models_train.csv" --json "$OUT/cpu_models_train.json"
run cpu_models_infer_b1 "$ACMIX" bench model "${MODELS[@]}" --mode infer "${INFER[@]}" "${M[@]}" --no-reference \
  --csv "$OUT/cpu_models_infer_b1.csv" --json "$OUT/cpu_models_infer_b1.json"
if [ "${QUICK:-0}" != 1 ]; then  # HaloNet needs maps divisible by its block size 8
  run cpu_peer "$ACMIX" bench model halonet26t acmix_resnet26 --mode train "${PEER[@]}" "${M[@]}" --no-reference \
    --memory off --csv "$OUT/cpu_peer.csv" --json "$OUT/cpu_peer.json"
fi
