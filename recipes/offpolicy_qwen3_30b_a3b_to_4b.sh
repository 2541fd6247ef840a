#!/usr/bin/env bash
# Off-policy KD: Qwen3-30B-A3B -> Qwen3-4B on one 8-GPU node with Ray (1 teacher, 8 FSDP2 students),
# the teacher scoring the next global batch while the students train.
set -euo pipefail
DATA=${DATA:?set DATA to your training data (jsonl, parquet, saved dataset or hub name)}
EVAL=${EVAL:-null}
kdlib '+recipe=[offpolicy,ray]' teacher=qwen3_30b_a3b student=qwen3_4b \
  data.train="$DATA" data.eval="$EVAL" data.max_len=4096 \
  device=cuda student.num_workers=8 launcher.gpus_per_worker=1 pipeline.prefetch=1 \
  student.fsdp.param_dtype=bfloat16 \
  train.global_batch_size=128 train.max_tokens_per_micro_batch=16384 train.lr=1e-5 \
  train.checkpoint_every=200 loss=kl algorithm.kd_ratio=0.5 "$@"
