#!/usr/bin/env bash
# On-policy KD (KDFlow's on_policy_kd example): Qwen3-4B samples on SGLang rollout engines,
# Qwen3-30B-A3B (FP8, SGLang) scores every sampled token, reverse KL; after every step the
# student's weights go to the rollout engines in buckets (one SGLang weight-update session, then
# one cache flush). Colocated on one 8-GPU node: each GPU holds a teacher engine, a rollout engine
# and a student rank; the engines release their memory while the students train. Starting values
# for 96 GB GPUs; not run on hardware yet (docs/gpu.md).
set -euo pipefail
DATA=${DATA:?set DATA to your prompts (any supported format; responses are not needed)}
kdlib '+recipe=[onpolicy,ray,sglang]' teacher=qwen3_30b_a3b student=qwen3_4b \
  data.train="$DATA" data.eval=null data.max_len=4096 \
  teacher.num_workers=8 rollout.num_workers=8 student.num_workers=8 \
  launcher.rollout.colocate_with=teacher launcher.student.colocate_with=teacher \
  launcher.teacher.gpus_per_worker=0.4 launcher.rollout.gpus_per_worker=0.2 launcher.student.gpus_per_worker=0.4 \
  pipeline.colocate=true teacher.backend.quantization=fp8 teacher.backend.mem_fraction_static=0.5 \
  teacher.backend.offload_tags=[kv_cache,cuda_graph] \
  rollout.mem_fraction_static=0.2 rollout.release_memory=true \
  rollout.max_new_tokens=2048 rollout.n_samples_per_prompt=4 train.global_batch_size=128 \
  train.max_steps=500 train.lr=1e-6 "$@"
