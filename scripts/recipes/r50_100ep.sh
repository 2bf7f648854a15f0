#!/usr/bin/env bash
# MoCo v3 ResNet-50, 100 epochs, batch 4096 on 2 nodes x 8 GPUs (the paper's recipe; LARS needs whole
# parameters: DDP, fp16 with loss scaling on GPU as the reference).  Usage: $0 DATA HOSTFILE [flags]
source "$(dirname "$0")/common.sh"
recipe 2 ds_configs/ddp.json pretrain -a resnet50 -b 4096 --optimizer lars --lr 0.6 --wd 1e-6 \
  --epochs 100 --warmup-epochs 10 --moco-m 0.99 --moco-m-cos --moco-t 1.0 --crop-min 0.2 --output-dir "${OUT:-runs/$(basename "$0" .sh)}" --resume auto -- "$@"
