"""Does splitting the same samples into more, smaller forward calls cost time?

A routed run with two teachers makes more, smaller micro-batches than the one-teacher run over the
same samples (docs/benchmarks.md, several teachers). This runs the default job's pruned student
(bf16, read as a checkpoint: run the default job once first) forward over the same 8 random
sequences as 2 calls of 4, 3 calls of 4, 1 and 3, 4 calls of 2 and 8 calls of 1, packed (one row,
position ids restarting per sequence) and padded, interleaved, and prints the median seconds of 5
repetitions per split. Equal or lower times for more calls mean a call has no fixed cost worth
counting at these sizes.

    python benchmarks/call_sizes.py
"""

from __future__ import annotations

import statistics
import time

import torch


def main() -> None:
    from transformers import AutoModelForCausalLM

    from multi_teacher import student

    path = student()[0].split("=", 1)[1]
    decoder = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval().model
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(100, 40000, (n,), generator=generator) for n in (130, 90, 160, 120, 100, 140, 110, 150)]
    splits = {
        "4+4": [sequences[:4], sequences[4:]],
        "4+1+3": [sequences[:4], sequences[4:5], sequences[5:]],
        "2+2+2+2": [sequences[i:i + 2] for i in range(0, 8, 2)],
        "1 x 8": [[s] for s in sequences],
    }

    def packed(calls):
        for call in calls:
            positions = torch.cat([torch.arange(len(s)) for s in call])[None]
            decoder(input_ids=torch.cat(call)[None], position_ids=positions, use_cache=False)

    def padded(calls):
        for call in calls:
            length = max(len(s) for s in call)
            ids = torch.zeros(len(call), length, dtype=torch.long)
            mask = torch.zeros(len(call), length, dtype=torch.long)
            for row, s in enumerate(call):
                ids[row, : len(s)], mask[row, : len(s)] = s, 1
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)

    with torch.inference_mode():
        for layout in (packed, padded):
            layout(splits["4+4"])  # warm-up
            seconds = {name: [] for name in splits}
            for _ in range(5):
                for name, calls in splits.items():
                    start = time.perf_counter()
                    layout(calls)
                    seconds[name].append(time.perf_counter() - start)
            print(layout.__name__, {name: round(statistics.median(s), 3) for name, s in seconds.items()})


if __name__ == "__main__":
    main()
