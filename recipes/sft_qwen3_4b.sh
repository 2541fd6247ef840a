#!/usr/bin/env bash
# Supervised fine-tuning of Qwen3-4B on the data's responses (no teacher).
set -euo pipefail
DATA=${DATA:?set DATA to your training data}
kdlib '+recipe=[sft,ray]' student=qwen3_4b data.train="$DATA" data.eval=null data.max_len=4096 \
  device=cuda student.num_workers=8 launcher.gpus_per_worker=1 \
  train.global_batch_size=128 train.lr=1e-5 "$@"
