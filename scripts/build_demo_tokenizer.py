"""Rebuild kdlib's demo tokenizer (src/kdlib/data/builtin/demo_tokenizer) from the shipped data.

The cross-tokenizer demo distils SmolLM2 (byte-level BPE, 49,152 tokens) into a student with a
genuinely different tokenizer: a metaspace BPE with byte fallback, split digits, a BOS token and a
ChatML-like template (kdlib.xtok.metaspace), trained on the texts of the shipped training split
and on-policy prompts (never the held-out eval split, whose bits per byte the demo reports).

    python scripts/build_demo_tokenizer.py            # rewrite the shipped files
    python scripts/build_demo_tokenizer.py --check    # rebuild in memory, fail unless identical
    python scripts/build_demo_tokenizer.py --out DIR  # write elsewhere

The files are written by this script (sorted keys, fixed layout), not by save_pretrained, so a
rebuild with the same ``tokenizers`` version is byte-identical.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "kdlib" / "data" / "builtin"
SOURCES = ("smol_instruct_train.jsonl", "prompts.jsonl")
VOCAB_SIZE = 4096


def training_texts() -> list[str]:
    """Every conversation of the training sources, in file order, as its chat rendering (the
    special tokens take no part in training; the role names do)."""
    texts = []
    for name in SOURCES:
        with (BUILTIN / name).open(encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                texts.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in row["messages"]))
    return texts


def render_files() -> dict[str, str]:
    """File name -> content of the tokenizer directory."""
    from kdlib.xtok.metaspace import BOS, CHAT_TEMPLATE, EOS, PAD, UNK, build_metaspace_tokenizer

    tokenizer = build_metaspace_tokenizer(training_texts(), model="bpe", vocab_size=VOCAB_SIZE)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    config = {
        "backend": "tokenizers",
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "eos_token": EOS,
        "model_max_length": 8192,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK,
    }
    return {
        "tokenizer.json": json.dumps(spec, ensure_ascii=False, indent=1, sort_keys=True) + "\n",
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2, sort_keys=True) + "\n",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUILTIN / "demo_tokenizer")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out")
    args = parser.parse_args()
    files = render_files()
    if args.check:
        differ = [n for n, text in files.items() if (args.out / n).read_text(encoding="utf-8") != text]
        print("identical" if not differ else f"differ: {differ}")
        return 1 if differ else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
