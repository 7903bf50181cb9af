#!/usr/bin/env bash
# The one prepared GPU run (issues 4 and 8): backend correctness, GPU-marked tests, `bench op` on CUDA, and the
# model comparison (batch 64, bf16, channels_last) including the ACmix-ResNet-50 training-step memory against the
# official-style unfold formulation. Sized for ~9 minutes on one H100/H200. Writes logs and tables into $OUT.
#   run from the repository root:  bash benchmarks/gpu_all.sh
set -u
OUT=${OUT:-/tmp/acmix_gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, timm, acmix
print("torch", torch.__version__, "timm", timm.__version__, "acmix", acmix.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
echo "== gpu-marked tests"; timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu -x tests/test_backends.py tests/test_train_cli.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
echo "== backend check + bench op"; timeout 150 python3 benchmarks/gpu_check.py --budget 100 --json "$OUT/gpu_check.json" 2>&1 | tail -60 | tee "$OUT/gpu_check.txt"
echo "== model comparison"; timeout 200 python3 benchmarks/gpu_models.py acmix_resnet50 acmix_resnet26 acmix_swin_tiny_patch4_window7_224 acmix_pvt_tiny acmix_san10 --budget-s 140 --out "$OUT" 2>&1 | tail -60 | tee "$OUT/gpu_models.txt"
