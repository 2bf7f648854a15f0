#!/usr/bin/env bash
# The GPU check: every open GPU question in one call of at most 7.5 minutes on one H100/H200 node, the most
# important first. Each stage has its own time limit and each row its own try (an error is written in its
# row); tables go to $OUT/*.md, everything printed to $OUT/log.txt.
#   1. equivalence.md  engine equivalence on CUDA at world 1: every shipped config, fp32, TF32 off, vs the oracle
#   2. bench_vit.md    ViT-B/16 and ViT-S/16 bf16 steps per engine (DDP, FSDP, ZeRO-2, ZeRO-3), batch 256/128,
#                      activation checkpointing off/on: step time, img/s, MFU (measured matmul peak and
#                      datasheet), peak memory, the planner's estimate
#   3. bench_resnet.md ResNet-50, LARS, synced BN, DDP bf16, batch 128, channels_last off/on
#   4. hot_path.md     ViT-B/16 batch 256, DDP and FSDP bf16: shipped, and with one part of the hot path changed
#                      (unfused AdamW, FSDP's implicit prefetch, per-block torch.compile)
#   5. chunking.md     ViT-B/16 per-GPU batch 4096 with backbone chunking K = 128 against unchunked 256
#   6. finetune.md     the fine-tuning step (ViT-B/16, MAE's layer-decay groups, batch 128): a plain timm + AdamW
#                      bf16 step against moco-scale's DDP, FSDP and ZeRO-3 steps: ms/step, img/s, peak memory
#   7. data.md         the data path alone, --augment cpu (the reference pipeline in the workers) and device
#                      (the views made on the GPU), 4-14 workers, JPEGs from scikit-image's photos, against
#                      the images/s the ViT-B step consumes
#
#   bash scripts/gpu_check.sh             # on the GPU node (python3 there; .whl/ from scripts/gpu_wheels.sh)
#   bash scripts/gpu_check.sh --dry-run   # here, on the CPU: tiny shapes, every stage, 2-3 minutes
# OUT picks the folder (default runs/gpu_check); PYTHON the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
# the repository is importable without an install (a GPU node has none): scripts and tests/gpu_equivalence.py
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
  PYTHONWARNINGS="ignore::FutureWarning,ignore::UserWarning" \
  TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}  # DeepSpeed's ops, away from a stale lock in ~/.cache
if [ $DRY = 1 ]; then
  PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  DEVICE=cpu
  export DS_ACCELERATOR=cpu
else
  PYTHON=${PYTHON:-python3}
  DEVICE=cuda
  if ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then  # an air-gapped node: the wheels travel with the repo
    if ! ls .whl/*.whl >/dev/null 2>&1; then
      echo "gpu_check: $PYTHON has no deepspeed and .whl/ holds no wheels: run scripts/gpu_wheels.sh where pip" \
           "reaches an index, and bring .whl/ along" >&2
      exit 2
    fi
    SITE=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" DS_BUILD_OPS=0
  fi
fi
if ! "$PYTHON" -c "import torch, timm, deepspeed, sklearn, skimage, psutil
assert '$DEVICE' == 'cpu' or torch.cuda.is_available()"
then
  echo "gpu_check: $PYTHON needs torch (with CUDA unless --dry-run), timm, deepspeed, scikit-learn, scikit-image" \
       "and psutil" >&2
  exit 2
fi
"$PYTHON" -c "import torch, deepspeed; print(f'torch {torch.__version__}, deepspeed {deepspeed.__version__}')"
[ $DRY = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

status=0
# stage NAME LIMIT_S SCRIPT ARGS...: the table lines ('#', '|') of its output into $OUT/NAME.md
stage() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$PYTHON" "$@" | tee "$OUT/$name.raw"
  local rc=${PIPESTATUS[0]}
  grep -E '^(# |\|)' "$OUT/$name.raw" > "$OUT/$name.md"
  rm -f "$OUT/$name.raw"
  echo "== $name: exit $rc after $((SECONDS - start))s"
  [ "$rc" -eq 0 ] || status=1
}
if [ $DRY = 1 ]; then
  stage equivalence 90 tests/gpu_equivalence.py --device cpu
  stage bench_vit 90 scripts/bench_gpu.py --device cpu --tiny --archs vit_base --batches 8 --steps 1 \
    --budget-s 50 --json "$OUT/bench_gpu.json"
  stage bench_resnet 40 scripts/bench_gpu.py --device cpu --tiny --archs resnet50 --engines ddp_bf16 \
    --optimizer lars --batches 8 --ac 0 --channels-last 0 1 --steps 1
  stage hot_path 100 scripts/bench_gpu.py --device cpu --tiny --archs vit_base --engines ddp_bf16 fsdp --batches 8 \
    --ac 0 --steps 1 --variants shipped unfused no_prefetch compiled --budget-s 90
  stage chunking 60 scripts/bench_chunking.py --device cpu --precision bf16 -a vit_tiny --image-size 32 \
    --batches 8 --chunks 0 8 --steps 1
  stage finetune 60 scripts/bench_finetune.py --device cpu --tiny --batch 8 --steps 1 --engines ddp_bf16 fsdp zero3
  stage data 60 scripts/bench_data.py --workers 0 2 --count 64 --size 96 --batch 16 --batches 2 \
    --step-json "$OUT/bench_gpu.json"
else
  stage equivalence 50 tests/gpu_equivalence.py --device cuda
  stage bench_vit 120 scripts/bench_gpu.py --archs vit_base vit_small --engines ddp_bf16 fsdp zero2 zero3 \
    --batches 256 128 --ac 0 1 --steps 4 --budget-s 105 --json "$OUT/bench_gpu.json"
  stage bench_resnet 40 scripts/bench_gpu.py --archs resnet50 --engines ddp_bf16 --optimizer lars \
    --batches 128 --ac 0 --channels-last 0 1 --steps 4 --budget-s 30
  stage hot_path 75 scripts/bench_gpu.py --archs vit_base --engines ddp_bf16 fsdp --batches 256 --ac 0 --steps 4 \
    --variants shipped unfused no_prefetch compiled --budget-s 65
  stage chunking 60 scripts/bench_chunking.py --device cuda --precision bf16 --image-size 224 -a vit_base \
    --batches 256 4096 --chunks 0 128 --steps 2
  stage finetune 40 scripts/bench_finetune.py --device cuda --arch vit_base --batch 128 --steps 4 \
    --engines ddp_bf16 fsdp zero3
  stage data 65 scripts/bench_data.py --device cuda --augment cpu device --workers 4 8 14 --count 512 \
    --batch 128 --batches 3 --budget-s 50 --step-json "$OUT/bench_gpu.json"
fi
echo "gpu_check: tables in $OUT (*.md), log in $OUT/log.txt; exit $status"
exit $status
