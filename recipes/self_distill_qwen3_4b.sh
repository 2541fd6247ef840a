#!/usr/bin/env bash
# On-policy self-distillation (KDFlow's self-distillation): Qwen3-4B samples on SGLang rollout
# engines and learns from an exponential moving average of itself (a transformers teacher: the
# SGLang teacher cannot take weights from the student). One 8-GPU node, each GPU holding a
# teacher copy, a rollout engine and a student rank. Not run on hardware yet (docs/gpu.md).
set -euo pipefail
DATA=${DATA:?set DATA to your prompts}
kdlib '+recipe=[self_distill,ray,sglang]' student=qwen3_4b teacher/backend=hf \
  data.train="$DATA" data.eval=null data.max_len=4096 \
  teacher.num_workers=8 rollout.num_workers=8 student.num_workers=8 \
  launcher.rollout.colocate_with=teacher launcher.student.colocate_with=teacher \
  launcher.teacher.gpus_per_worker=0.4 launcher.rollout.gpus_per_worker=0.2 launcher.student.gpus_per_worker=0.4 \
  rollout.mem_fraction_static=0.2 rollout.release_memory=true \
  rollout.max_new_tokens=2048 rollout.n_samples_per_prompt=4 train.global_batch_size=128 \
  train.max_steps=500 "$@"
