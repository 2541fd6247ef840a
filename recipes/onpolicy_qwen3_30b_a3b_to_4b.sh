#!/usr/bin/env bash
# On-policy KD: Qwen3-4B samples, Qwen3-30B-A3B scores every token, reverse KL, weights synced
# to the rollout engines after every step.
set -euo pipefail
DATA=${DATA:?set DATA to your prompts (any supported format; responses are not needed)}
kdlib '+recipe=[onpolicy,ray]' teacher=qwen3_30b_a3b student=qwen3_4b \
  data.train="$DATA" data.eval=null data.max_len=4096 device=cuda \
  student.num_workers=4 rollout.num_workers=2 launcher.gpus_per_worker=1 \
  rollout.max_new_tokens=2048 rollout.n_samples_per_prompt=4 train.global_batch_size=128 \
  train.max_steps=500 train.lr=1e-6 "$@"
