#!/usr/bin/env bash
# Rebuild the instruction data shipped with kdlib (src/kdlib/data/builtin/smol_instruct_*.jsonl):
# SmolLM2-135M-Instruct answers kdlib's own 320 prompts through kdlib's generate mode
# (sequence-level KD data synthesis), then every 6th kept row goes to the held-out split. Each row
# also gets `teacher_prompt`, its prompt with a brevity instruction, for +recipe=context_distill.
# About 10 minutes on 2 CPU cores. Usage: scripts/build_smol_instruct.sh [extra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
.venv/bin/kdlib +recipe=generate teacher.dtype=bfloat16 seed=42 \
  generate.output="$out/generated.jsonl" hydra.run.dir="$out/run" "$@"
.venv/bin/python - "$out/generated.jsonl" src/kdlib/data/builtin <<'PY'
import json, sys
from pathlib import Path
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
BRIEF = "\n\nAnswer in two or three plain sentences, without lists or code."
for row in rows:
    user = [m["content"] for m in row["messages"] if m["role"] == "user"][-1]
    row["teacher_prompt"] = user + BRIEF
target = Path(sys.argv[2])
splits = {"train": [r for i, r in enumerate(rows) if i % 6], "eval": [r for i, r in enumerate(rows) if not i % 6]}
for name, part in splits.items():
    with open(target / f"smol_instruct_{name}.jsonl", "w", encoding="utf-8") as handle:
        for row in part:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{name}: {len(part)} rows")
PY
