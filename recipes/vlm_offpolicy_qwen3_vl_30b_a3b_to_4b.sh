#!/usr/bin/env bash
# Off-policy vision-language KD: Qwen3-VL-30B-A3B -> Qwen3-VL-4B on one 8-GPU node with Ray
# (1 hf teacher + 7 FSDP2 students, frozen vision towers), KDFlow's
# off_policy_kd/run_qwen3_vl_30b_a3b_to_4b.sh. DATA: image+text chats (messages with image parts, or
# LLaVA/ShareGPT conversations with an image column, e.g. a local copy of lmms-lab/llava-critic-113k).
# Not run here: kdlib's machines have no GPU and no torchvision.
set -euo pipefail
DATA=${DATA:?set DATA to your image+text training data (jsonl, parquet, saved dataset or hub name)}
EVAL=${EVAL:-null}
python -c "import torchvision" 2>/dev/null || { echo "Qwen-VL processors need torchvision built for your torch" >&2; exit 1; }
kdlib '+recipe=[offpolicy,ray]' teacher=qwen3_vl_30b_a3b student=qwen3_vl_4b \
  data.train="$DATA" data.eval="$EVAL" data.max_len=4096 data.images_key=image \
  device=cuda student.num_workers=7 launcher.gpus_per_worker=1 pipeline.prefetch=1 \
  student.fsdp.param_dtype=bfloat16 \
  train.global_batch_size=128 train.micro_batch_size=8 train.lr=2e-5 train.warmup_ratio=0.05 \
  loss=kl algorithm.kd_ratio=0.5 "$@"
