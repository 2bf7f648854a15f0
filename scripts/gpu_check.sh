#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one H100/H200.
#   1. engine equivalence on CUDA at world 1 (every shipped config, fp32, TF32 off, vs the oracle);
#   2. ViT-S/16 and ViT-B/16 pretraining steps in bf16 per engine, per-GPU batch 64/256,
#      activation checkpointing off/on: images/s, MFU and peak memory;
#   3. backbone chunking, ViT-B/16 bf16 at 224 on one GPU: per-rank batch 256 and 4096 (all 4096
#      negatives, 8192 crops), chunking off and K = 128: time per image, peak memory, planned activations.
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
timeout 120 "$PYTHON" scripts/gpu_equivalence.py | tee "$OUT/equivalence.md" || status=1
timeout 180 "$PYTHON" scripts/bench_gpu.py --engines ddp_bf16 fsdp zero2 zero3 --archs vit_small vit_base \
  --batches 64 256 --ac 0 1 --steps 4 | tee "$OUT/bench_gpu.md" || status=1
timeout 150 "$PYTHON" scripts/bench_chunking.py --device cuda --precision bf16 --image-size 224 -a vit_base \
  --batches 256 4096 --chunks 0 128 --steps 2 | grep -v "^\[" | tee "$OUT/bench_chunking.md" || status=1
exit $status
