"""How far a kdlib training step is from this machine's limit: a FLOP floor per step, by phase.

For a configuration, this script

1. runs real optimizer steps through kdlib (local launcher, the configured data and models);
2. counts the FLOPs each step needs with real tokens only (no padding): teacher forward, student
   forward and backward (2x forward), both heads at the loss positions (teacher logits, student
   logits, and the two gradient products of the student head), and, on-policy, the decode of the
   sampled tokens;
3. measures this machine's matrix-multiply throughput in the same process (float32, and bf16 when
   the run computes in bf16) on the shapes the models use, after every step, so that each step's
   floor uses the speed the machine had while that step ran;
4. profiles the steps with ``torch.profiler``, the library's entry points wrapped in
   ``record_function`` by this script (teacher forward, student forward, loss, backward, optimizer,
   rollout, weight sync), and prints per phase: measured seconds, FLOPs, floor = FLOPs /
   throughput, and their ratio; plus the FLOPs spent on padding.

    python benchmarks/step.py                          # issue 14's setup: 10-of-30 student, 4 chats, max_len 256, float32
    python benchmarks/step.py --default-job            # the default job's settings (dtype auto, 8 chats, max_len 512)
    python benchmarks/step.py --onpolicy               # on-policy steps (rollouts of 128 tokens)
    python benchmarks/step.py --extra train.packing=true   # any override
    python benchmarks/step.py --compile-layers         # the lever of issue 14 measured, not a kdlib option:
                                                       # each decoder layer torch.compile'd (inductor)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

PHASES = {
    # marker: (module path, attribute) of what it wraps
    "teacher_forward": ("kdlib.workers.teacher", "TeacherWorker.score"),
    "student_forward": ("kdlib.algorithms.base", "Algorithm.student_forward"),
    "loss": ("kdlib.algorithms.vanilla", "distillation_loss"),
    "backward": ("torch", "Tensor.backward"),
    "optimizer": ("torch.optim", "AdamW.step"),
    "rollout": ("kdlib.workers.rollout", "RolloutWorker.generate"),
    "sync": ("kdlib.workers.rollout", "RolloutWorker.load_weights"),
}


@dataclass
class Shapes:
    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, model) -> "Shapes":
        c = model.config.get_text_config()
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.num_hidden_layers, c.hidden_size, c.num_attention_heads * head_dim,
                   c.num_key_value_heads * head_dim, c.intermediate_size, c.vocab_size)

    def forward_flops(self, length: int) -> float:
        """One causal forward over ``length`` tokens (decoder only; no head)."""
        h = self.hidden
        dense = 2 * length * h * (self.q_dim + 2 * self.kv_dim + h) + 2 * length * 3 * h * self.intermediate
        attention = 2 * 2 * (length * (length + 1) / 2) * self.q_dim  # QK^T and AV, causal half
        return self.layers * (dense + attention)

    def head_flops(self, rows: int) -> float:
        return 2 * rows * self.hidden * self.vocab

    def decode_flops(self, context: int) -> float:
        """One generated token with a KV cache over ``context`` tokens, head included."""
        h = self.hidden
        dense = 2 * h * (self.q_dim + 2 * self.kv_dim + h) + 2 * 3 * h * self.intermediate
        return self.layers * (dense + 4 * context * self.q_dim) + self.head_flops(1)


def matmul_throughput(dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 10) -> float:
    """Best-of FLOP/s of an [m, k] x [k, n] product in ``dtype``."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def measure_rates(shapes: "Shapes", bf16: bool) -> dict[str, float]:
    """This machine's matrix-product FLOP/s now: float32 on the decoder's shape, float32 on the
    head's, and the low precision (bf16, or float32 again) the models may compute in. Measured
    after every step, so each step's floor uses the speed the machine had while it ran (on a
    shared or frequency-scaling machine the best-of rate drifts by 20-30% within minutes)."""
    fp32 = matmul_throughput(torch.float32, 1024, shapes.hidden, shapes.intermediate, repeats=5)
    return {
        "float32": fp32,
        "head": matmul_throughput(torch.float32, 256, shapes.hidden, shapes.vocab, repeats=3),
        "low": matmul_throughput(torch.bfloat16, 1024, shapes.hidden, shapes.intermediate, repeats=5) if bf16 else fp32,
    }


def _phase_floors(flops: dict, decode: float, rate: dict, cfg) -> dict[str, float]:
    """Seconds each phase of one step needs at ``rate`` (FLOPs with real tokens only / FLOP/s)."""
    teacher_rate = rate["low"] if cfg.teacher.dtype.value == "bfloat16" else rate["float32"]
    student_rate = rate["low"] if cfg.student.autocast is True else rate["float32"]
    return {
        "teacher_forward": flops["teacher"] / teacher_rate,
        "student_forward": flops["student_forward"] / student_rate,
        "backward": flops["student_backward"] / student_rate,
        "loss": flops["heads"] / rate["head"],  # the loss always computes in float32
        "rollout": decode / student_rate,
    }


def instrument() -> None:
    """Wrap the library's entry points so each call is a named profiler range."""
    import importlib

    for marker, (module_name, attr) in PHASES.items():
        owner = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = owner.__dict__[name] if name in owner.__dict__ else getattr(owner, name)
        is_static = isinstance(original, staticmethod)
        fn = original.__func__ if is_static else original

        def wrapped(*args, __fn=fn, __marker=f"kdlib.{marker}", **kwargs):
            with torch.profiler.record_function(__marker):
                return __fn(*args, **kwargs)

        setattr(owner, name, staticmethod(wrapped) if is_static else wrapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-job", action="store_true", help="the default job's settings instead of issue 14's setup")
    parser.add_argument("--onpolicy", action="store_true", help="on-policy steps (+recipe=onpolicy)")
    parser.add_argument("--steps", type=int, default=4, help="steps measured (after one warm-up step)")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides")
    parser.add_argument("--compile-layers", action="store_true",
                        help="torch.compile (inductor, dynamic shapes) every decoder layer of teacher and student "
                             "in place before the warm-up step (which then also compiles)")
    args = parser.parse_args()

    import kdlib
    from kdlib.hardware import bf16_support, cpu_capability
    from kdlib.models.head import decoder_of
    from kdlib.runner import built

    overrides = ["device=cpu", "logging.progress=false", "eval.before=false", "save_student=false"]
    if not args.default_job:
        overrides += ["student.num_layers=10", "train.global_batch_size=4", "train.micro_batch_size=4",
                      "data.max_len=256", "teacher.dtype=float32", "student.autocast=false"]
    if args.onpolicy:
        overrides += ["+recipe=onpolicy", "rollout.max_new_tokens=128", "rollout.batch_size=4"]
    overrides += [f"train.max_steps={args.steps + 1}", *args.extra]
    cfg = kdlib.compose(overrides)
    bf16 = cfg.teacher.dtype.value == "bfloat16" or cfg.student.autocast is True

    instrument()
    with built(cfg) as mode:
        pipeline = mode.pipeline
        teacher_model = pipeline.teacher.group.workers[0].backend.model
        student_model = pipeline.students.group.workers[0].model
        t_shapes, s_shapes = Shapes.of(teacher_model), Shapes.of(student_model)
        if args.compile_layers:
            for model in (teacher_model, student_model):
                for layer in decoder_of(model).layers:
                    layer.compile(dynamic=True)
        batches = mode.sample_batches()
        mode.start(1)
        warm_start = time.perf_counter()
        mode.step(next(batches), 1)  # warm-up (allocations, first-call overheads, compilation)
        warm_up_s = time.perf_counter() - warm_start
        times, flops, padding, decode, rates = [], [], [], [], []
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities) as prof:
            for step in range(2, args.steps + 2):
                start = time.perf_counter()  # on-policy, drawing the samples runs the rollouts
                samples = next(batches)
                mode.step(samples, step)
                times.append(time.perf_counter() - start)
                flops.append(_step_flops(samples, t_shapes, s_shapes))
                padding.append(_padding_flops(pipeline, samples, t_shapes, s_shapes))
                decode.append(sum(s_shapes.decode_flops(len(x.student.input_ids)) * x.student.n_loss_tokens
                                  for x in samples) if args.onpolicy else 0.0)
                rates.append(measure_rates(s_shapes, bf16))  # the machine's speed right after this step
        phase_seconds = {m: 0.0 for m in PHASES}
        for event in prof.key_averages():
            if event.key.startswith("kdlib."):
                phase_seconds[event.key[len("kdlib."):]] += event.cpu_time_total / 1e6 / args.steps

    floors = [_phase_floors(f, d, r, cfg) for f, d, r in zip(flops, decode, rates)]
    floor = {phase: statistics.mean(f[phase] for f in floors) for phase in floors[0]}
    ratios = [t / sum(f.values()) for t, f in zip(times, floors)]
    rate = {k: statistics.mean(r[k] for r in rates) for k in rates[0]}
    fp32, head32, low = rate["float32"], rate["head"], rate["low"]
    mean = {k: statistics.mean(v[k] for v in flops) for k in flops[0]}
    step_s = statistics.mean(times)
    floor_s = sum(floor.values())
    print(f"\nwarm-up step: {warm_up_s:.1f} s" + (" (compiles the layers)" if args.compile_layers else ""))
    print(f"CPU: {cpu_capability()}, native bf16: {bf16_support('cpu').native} ({bf16_support('cpu').reason})")
    spread = min(r["float32"] for r in rates) / 1e9, max(r["float32"] for r in rates) / 1e9
    print(f"matmul throughput (mean of the measurements after each step): float32 {fp32 / 1e9:.0f} GFLOP/s "
          f"(range {spread[0]:.0f}-{spread[1]:.0f}; head shape {head32 / 1e9:.0f})"
          + (f", bf16 {low / 1e9:.0f} GFLOP/s" if bf16 else ""))
    print(f"setup: teacher {t_shapes.layers} layers {cfg.teacher.dtype.value}, student {s_shapes.layers} layers "
          f"(autocast {cfg.student.autocast}), {cfg.train.global_batch_size} chats/step, packing {cfg.train.packing}, "
          f"loss tokens/step {statistics.mean(f['loss_tokens'] for f in flops):.0f}, tokens/step {statistics.mean(f['tokens'] for f in flops):.0f}")
    print(f"\n{'phase':18}{'measured s':>12}{'GFLOP':>10}{'floor s':>10}{'ratio':>8}")
    gflop = {"teacher_forward": mean["teacher"], "student_forward": mean["student_forward"],
             "backward": mean["student_backward"], "loss": mean["heads"],
             "rollout": statistics.mean(decode) if decode else 0.0}
    for phase in PHASES:
        seconds = phase_seconds[phase]
        if not seconds and not gflop.get(phase):
            continue
        phase_floor = floor.get(phase)
        ratio = f"{seconds / phase_floor:8.2f}" if phase_floor else f"{'':8}"
        print(f"{phase:18}{seconds:12.3f}{gflop.get(phase, 0) / 1e9:10.1f}{(phase_floor or 0):10.3f}{ratio}")
    # backward is measured around loss.backward(), which also runs the fused loss's backward (a scale)
    print(f"{'step':18}{step_s:12.3f}{sum(gflop.values()) / 1e9:10.1f}{floor_s:10.3f}{statistics.mean(ratios):8.2f}"
          f"   (per step: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"padding waste: {statistics.mean(padding) / 1e9:.1f} GFLOP/step "
          f"({statistics.mean(padding) / sum(gflop.values()):.0%} of the real-token FLOPs)")


def _step_flops(samples, teacher: Shapes, student: Shapes) -> dict[str, float]:
    t = sum(teacher.forward_flops(len(s.teacher_view.input_ids)) for s in samples)
    f = sum(student.forward_flops(len(s.student.input_ids)) for s in samples)
    rows = sum(s.student.n_loss_tokens for s in samples)
    heads = teacher.head_flops(rows) + 3 * student.head_flops(rows)  # teacher logits; student logits + 2 grads
    return {"teacher": t, "student_forward": f, "student_backward": 2 * f, "heads": heads, "loss_tokens": rows,
            "tokens": sum(len(s.student.input_ids) for s in samples)}


def _padding_flops(pipeline, samples, teacher: Shapes, student: Shapes) -> float:
    """FLOPs of the padded positions the step's micro-batches actually computed."""
    plan, batches = pipeline.data.step_batches(samples, pipeline.cfg.train, pipeline.students.size)
    wasted = 0.0
    for batch in batches:
        view = batch.student
        rows, length = view.input_ids.shape
        real = view.n_tokens
        if view.packed:
            continue
        per_token_t = teacher.forward_flops(length) / length
        per_token_s = student.forward_flops(length) / length
        wasted += (rows * length - real) * (per_token_t + 3 * per_token_s)
    return wasted


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
