#!/usr/bin/env bash
# The main job: set up .venv, pretrain a tiny ViT on the built-in digits with 2 CPU processes
# (a few minutes), then compare frozen features of the pretrained and the randomly initialised
# encoder with kNN and linear probes on the held-out split. Re-running starts a fresh run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" DS_ACCELERATOR=cpu
OUT=${OUT:-runs/quickstart}
NPROC=${NPROC:-2}
torchrun --nproc_per_node "$NPROC" -m moco_scale.pretrain \
  -a vit_tiny --patch-size 4 --embed-dim 128 --depth 4 --num-heads 4 \
  --moco-dim 128 --moco-mlp-dim 512 --moco-t 0.2 --moco-m 0.99 --moco-m-cos \
  --optimizer adamw --lr 1e-3 --wd 0.1 --epochs 30 --warmup-epochs 5 --crop-min 0.2 \
  -b 128 -j 0 -p 10 --engine-config ds_configs/ddp.json --output-dir "$OUT" --overwrite "$@"
moco-scale probe --pretrained "$OUT/checkpoint.pth.tar"
echo "run folder: $OUT (config.json, metrics.jsonl, tensorboard/, checkpoint.pth.tar, probe.json)"
