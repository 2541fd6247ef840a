#!/usr/bin/env bash
# Sequence-level KD: the teacher answers the prompts once, then the student is fine-tuned on them.
set -euo pipefail
PROMPTS=${PROMPTS:?set PROMPTS to a prompt file}
OUT=${OUT:-teacher_answers.jsonl}
kdlib +recipe=generate teacher=qwen3_8b device=cuda data.train="$PROMPTS" generate.output="$OUT" \
  rollout.max_new_tokens=1024 rollout.batch_size=64
kdlib +recipe=sft student=qwen3_1_7b device=cuda data.train="$OUT" data.eval=null "$@"
