#!/usr/bin/env bash
# Sequence-level KD: the teacher answers the prompts once (on an SGLang engine), then the student
# is fine-tuned on the answers.
set -euo pipefail
PROMPTS=${PROMPTS:?set PROMPTS to a prompt file}
OUT=${OUT:-teacher_answers.jsonl}
kdlib '+recipe=[generate,sglang]' teacher=qwen3_8b data.train="$PROMPTS" generate.output="$OUT" \
  rollout.max_new_tokens=1024
kdlib +recipe=sft student=qwen3_1_7b device=cuda data.train="$OUT" data.eval=null "$@"
