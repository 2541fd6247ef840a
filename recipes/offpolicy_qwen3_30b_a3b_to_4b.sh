#!/usr/bin/env bash
# Off-policy KD (KDFlow's off_policy_kd example): Qwen3-30B-A3B -> Qwen3-4B on one 8-GPU node.
# KDFlow's colocated layout: every GPU holds one SGLang teacher engine (tp 1) and one FSDP2
# student rank; the teacher prefills the global batch (hidden states at the loss rows), then
# releases its KV cache and CUDA graphs while the students train (its bf16 weights, 61 GB, stay:
# copying them to the host and back every step would cost seconds). Starting values for 96 GB
# GPUs (H20); on 80 GB GPUs add teacher.backend.quantization=fp8. Not run on hardware yet: see
# docs/gpu.md (first checks, expected step time).
set -euo pipefail
DATA=${DATA:?set DATA to your training data (jsonl, parquet, saved dataset or hub name)}
EVAL=${EVAL:-null}
kdlib '+recipe=[offpolicy,ray,sglang]' teacher=qwen3_30b_a3b student=qwen3_4b \
  data.train="$DATA" data.eval="$EVAL" data.max_len=4096 \
  teacher.num_workers=8 student.num_workers=8 launcher.student.colocate_with=teacher \
  launcher.teacher.gpus_per_worker=0.5 launcher.student.gpus_per_worker=0.5 \
  pipeline.colocate=true teacher.backend.mem_fraction_static=0.75 teacher.backend.offload_tags=[kv_cache,cuda_graph] \
  student.fsdp.param_dtype=bfloat16 \
  train.global_batch_size=128 train.max_tokens_per_micro_batch=16384 train.lr=1e-5 \
  train.checkpoint_every=200 loss=kl algorithm.kd_ratio=0.5 "$@"
