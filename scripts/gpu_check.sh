#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one H100/H200.
#   1. engine equivalence on CUDA at world 1 (every shipped config, fp32, TF32 off, vs the oracle);
#   2. ViT-S/16 and ViT-B/16 pretraining steps in bf16 per engine, per-GPU batch 64/128/256,
#      activation checkpointing off/on: images/s, MFU and peak memory.
# Tables go to stdout and to $OUT (default runs/gpu_check). PYTHON picks the interpreter
# (default: .venv/bin/python if present, else python3); it needs torch, timm and deepspeed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1
if ! "$PYTHON" -c "import torch, timm, deepspeed, sklearn; assert torch.cuda.is_available()"; then
  echo "gpu_check: $PYTHON needs a CUDA torch, timm, deepspeed and scikit-learn" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
status=0
timeout 150 "$PYTHON" scripts/gpu_equivalence.py | tee "$OUT/equivalence.md" || status=1
timeout 300 "$PYTHON" scripts/bench_gpu.py --engines ddp_bf16 fsdp zero2 zero3 --archs vit_small vit_base \
  --batches 64 128 256 --ac 0 1 --steps 4 | tee "$OUT/bench_gpu.md" || status=1
exit $status
