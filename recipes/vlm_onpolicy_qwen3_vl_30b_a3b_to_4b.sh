#!/usr/bin/env bash
# On-policy vision-language KD: Qwen3-VL-4B answers questions about the images, Qwen3-VL-30B-A3B
# scores every sampled token with the same images, reverse KL, weights synced to the rollout
# engines after every step; KDFlow's on_policy_kd/run_qwen3_vl_30b_a3b_to_4b.sh. DATA: image+text
# prompts (responses are not needed). Not run here: kdlib's machines have no GPU and no torchvision.
set -euo pipefail
DATA=${DATA:?set DATA to your image+text prompts (any supported layout)}
python -c "import torchvision" 2>/dev/null || { echo "Qwen-VL processors need torchvision built for your torch" >&2; exit 1; }
kdlib '+recipe=[onpolicy,ray]' teacher=qwen3_vl_30b_a3b student=qwen3_vl_4b \
  data.train="$DATA" data.eval=null data.max_len=4096 data.images_key=image device=cuda \
  student.num_workers=4 rollout.num_workers=3 launcher.gpus_per_worker=1 \
  rollout.max_new_tokens=2048 rollout.n_samples_per_prompt=1 train.global_batch_size=128 \
  train.lr=2e-6 train.warmup_ratio=0.05 "$@"
