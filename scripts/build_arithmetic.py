"""Write kdlib's built-in arithmetic task (``src/kdlib/data/builtin/arithmetic_{train,eval}.jsonl``).

The task of ``+recipe=onpolicy_reward``: "What is a plus b?" for every pair 1 <= a, b <= 12 (144
questions), shuffled with a fixed seed and split into 112 training and 32 held-out rows. Each row
holds the question and a reference response ("a + b = c", for the held-out KL and any off-policy
step), the answer in the column ``answer`` (what ``reward=numeric`` checks) and, in
``teacher_prompt``, the question as the privileged teacher reads it: the question followed by the
exact reply, so the teacher puts its mass on the right number where the student is unsure. The
output is a pure function of this script: running it again rewrites the same bytes.

    python scripts/build_arithmetic.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "kdlib" / "data" / "builtin"
SEED = 29
N_EVAL = 32


def rows() -> list[dict]:
    pairs = [(a, b) for a in range(1, 13) for b in range(1, 13)]
    random.Random(SEED).shuffle(pairs)
    out = []
    for n, (a, b) in enumerate(pairs):
        question = f"What is {a} plus {b}?"
        reply = f"{a} + {b} = {a + b}"
        out.append({
            "id": f"add{n:03d}",
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
            "answer": str(a + b),
            "teacher_prompt": f"{question} Reply with exactly: {reply}",
        })
    return out


def write(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")


def main() -> None:
    items = rows()
    write(OUT / "arithmetic_eval.jsonl", items[:N_EVAL])
    write(OUT / "arithmetic_train.jsonl", items[N_EVAL:])
    print(f"wrote {len(items) - N_EVAL} training and {N_EVAL} held-out rows to {OUT}")


if __name__ == "__main__":
    main()
