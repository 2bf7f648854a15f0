#!/usr/bin/env bash
# MoCo v3 ViT-S/16, 300 epochs, batch 4096 on 4 nodes x 8 GPUs, ZeRO-2 in bf16.  Usage: $0 DATA HOSTFILE [flags]
source "$(dirname "$0")/common.sh"
recipe 4 ds_configs/zero2.json pretrain -a vit_small -b 4096 --optimizer adamw --lr 1.5e-4 --wd 0.1 \
  --epochs 300 --warmup-epochs 40 --moco-m 0.99 --moco-m-cos --moco-t 0.2 --stop-grad-conv1 --crop-min 0.08 \
  --output-dir "${OUT:-runs/$(basename "$0" .sh)}" --resume auto -- "$@"
