"""Does splitting the same samples into more, smaller calls cost time, and does a second teacher?

A routed run with two teachers makes more, smaller micro-batches than the one-teacher run over the
same samples (docs/benchmarks.md, several teachers): a global batch of 8 samples split 5 + 3
between two teachers becomes micro-batches of 4, 1 and 3 instead of 4 and 4. This runs the
default job's models as kdlib runs them (``load_causal_lm`` with the resolved config: bf16 where
the CPU computes it natively, kdlib's packed attention with each sample's boundaries passed as
varlen keywords, one packed row per call) over the same 8 random sequences of 90-160 tokens:

- ``teacher``: the SmolLM2-135M teacher's forward (inference mode), as 4+4, 4+1+3, 2+2+2+2 and
  one call of 8, and 4+4 and 4+1+3 with the second call(s) on a second copy of the teacher (two
  teacher models in memory, as ``routed_two_apart`` runs);
- ``student``: the pruned student's forward and backward (the sum of its last hidden states as
  the loss; float32 weights under bf16 autocast where the CPU computes bf16 natively, as the
  resolved config trains it), as 4+4, 4+1+3, 2+2+2+2 and 8;
- ``fused loss``: the chunked loss engine alone (cross-entropy through the student's head, 49,152
  x 576, float32, chunks of 256 rows) on random hidden rows as many as the sequences' tokens, per
  call forward and backward into the head's ``.grad``, as 4+4, 4+1+3, 2+2+2+2 and 8: every call
  makes and adds one head gradient, the fixed cost of a micro-batch or of a part of one;
- ``memory``: what that fixed cost is made of: a fresh zeroed float32 buffer the size of the
  student head's gradient, and four fresh [chunk, vocab] float32 buffers (a fused-loss call's chunk
  workspace) written once, against the same four buffers written again (memory the OS has already
  faulted in): the cost that the parts of a mixed micro-batch avoid by sharing one head gradient
  and one workspace (``kdlib.losses.shared_buffers``).

Splits are interleaved and repeated (``--repeats``, default 9); it prints the median and the
minimum seconds per split and the ratio of the medians to 4+4. The student is read from the
checkpoint the default job made (run it once first).

    python benchmarks/call_sizes.py
    python benchmarks/call_sizes.py --parts memory
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SEQUENCE_LENGTHS = (130, 90, 160, 120, 100, 140, 110, 150)
PARTS = ("teacher", "student", "loss", "memory")


def packed_forward(model, sequences: list[torch.Tensor]) -> torch.Tensor:
    """The last hidden states of ``sequences`` packed into one row, by kdlib's own forward."""
    from kdlib.batch import TokenBatch
    from kdlib.models.forward import final_hidden_states

    ids = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    batch = TokenBatch(input_ids=ids, attention_mask=None, loss_mask=torch.ones_like(ids, dtype=torch.bool),
                       position_ids=positions)
    return final_hidden_states(model, batch)


def timed(plans: dict, run, repeats: int) -> dict[str, list[float]]:
    """Seconds of each plan (a list of (model, sequences) calls), interleaved, after one warm-up."""
    for calls in plans.values():
        for model, group in calls:
            run(model, group)
    seconds: dict[str, list[float]] = {name: [] for name in plans}
    for _ in range(repeats):
        for name, calls in plans.items():
            start = time.perf_counter()
            for model, group in calls:
                run(model, group)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def report(title: str, seconds: dict[str, list[float]]) -> None:
    base = statistics.median(seconds["4+4"])
    print(f"\n{title}\n| split | median (s) | min (s) | vs 4+4 |\n|---|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {min(values):.3f} | {median / base:.3f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    args = parser.parse_args()

    import kdlib
    from kdlib.models.loading import load_causal_lm
    from kdlib.runner import resolved
    from multi_teacher import student

    cfg = resolved(kdlib.compose(["logging.progress=false", *student()]))
    cpu = torch.device("cpu")
    teacher = load_causal_lm(cfg.teacher, device=cpu).eval()
    copy = load_causal_lm(cfg.teacher, device=cpu).eval()
    pupil = load_causal_lm(cfg.student, device=cpu).train()
    print(f"teacher dtype {cfg.teacher.dtype.value}, student dtype {cfg.student.dtype.value} "
          f"(autocast {cfg.student.autocast}), "
          f"attention {cfg.teacher.attn_implementation}, torch threads {torch.get_num_threads()}")
    generator = torch.Generator().manual_seed(0)
    s = [torch.randint(100, 40000, (n,), generator=generator) for n in SEQUENCE_LENGTHS]

    def splits(model, second=None):
        second = second or model
        return {"4+4": [(model, s[:4]), (second, s[4:])],
                "4+1+3": [(model, s[:4]), (second, s[4:5]), (second, s[5:])],
                "2+2+2+2": [(model, s[i:i + 2]) for i in range(0, 8, 2)],
                "8": [(model, s)]}

    teacher_plans = splits(teacher)
    two = splits(teacher, copy)
    teacher_plans["4+4, two teachers"] = two["4+4"]
    teacher_plans["4+1+3, two teachers"] = two["4+1+3"]
    if "teacher" in args.parts:
        with torch.inference_mode():
            report("teacher forward", timed(teacher_plans, packed_forward, args.repeats))

    def train(model, group):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cfg.student.autocast)):
            hidden = packed_forward(model, group)
        hidden.float().sum().backward()

    if "student" in args.parts:
        report("student forward + backward", timed(splits(pupil), train, args.repeats))

    from kdlib.losses.engine import Plan, evaluate, even_chunks
    from kdlib.models.head import LMHead

    head = pupil.get_output_embeddings().weight.detach().float().clone().requires_grad_(True)
    width = head.shape[1]

    def loss(_, group):
        n = sum(len(x) for x in group)
        hidden = torch.randn(n, width, generator=generator).requires_grad_(True)
        plan = Plan(chunks=even_chunks(n, cfg.loss.chunk_size), head=LMHead(head), term=None,
                    targets=torch.cat(group) % head.shape[0], kd_weight=0.0, ce_weight=1.0)
        evaluate(plan, hidden, head, None)[0].backward()

    if "loss" in args.parts:
        report("fused loss (head gradient per call)", timed(splits(None), loss, args.repeats))
    if "memory" in args.parts:
        fresh_memory(tuple(head.shape), cfg.loss.chunk_size, args.repeats)


def fresh_memory(head_shape: tuple[int, int], chunk: int, repeats: int) -> None:
    """Milliseconds (median, min) of: zeroing a fresh float32 buffer of ``head_shape``; writing
    four fresh [chunk, vocab] float32 buffers once; writing the same four again."""
    def ms(run) -> list[float]:
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            out.append(1e3 * (time.perf_counter() - start))
        return out

    vocab = head_shape[0]
    kept = [torch.empty(chunk, vocab) for _ in range(4)]
    for buffer in kept:
        buffer.fill_(1.0)
    rows = {
        f"fresh zeroed head gradient {list(head_shape)} ({head_shape[0] * head_shape[1] * 4 / 1e6:.0f} MB)":
            ms(lambda: torch.zeros(head_shape)),
        f"4 fresh [{chunk}, {vocab}] buffers written once ({4 * chunk * vocab * 4 / 1e6:.0f} MB)":
            ms(lambda: [torch.empty(chunk, vocab).fill_(1.0) for _ in range(4)]),
        "the same 4 buffers written again": ms(lambda: [buffer.fill_(2.0) for buffer in kept]),
    }
    print("\nfresh memory (a fused-loss call's fixed cost)\n| buffer | median (ms) | min (ms) |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} |")


if __name__ == "__main__":
    main()
