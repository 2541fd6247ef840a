"""Estimator lab: what each teacher signal costs (bytes per token) and loses (loss bias, gradient
direction) against the exact hidden-state signal, on the default job's models and data.

The default job is built (the embedded SmolLM2-135M teacher, its depth-pruned student, the shipped
training data, its micro-batches); for the first ``--steps`` global batches, every micro-batch is
scored once by the teacher (hidden states, bf16 on the wire) and run through the student (its
initial weights, float32, no autocast). For each signal the teacher's hidden states are turned into
that signal exactly as the teacher worker does (:func:`kdlib.signals.signal_from_hidden`), and the
KD loss (``--losses``, pure KD: kd_weight 1, no CE) and its gradient with respect to the student's
final hidden states and head weight are computed by kdlib's chunked loss, against the exact
values from the hidden states. Sampled signals are drawn ``--draws`` times (seeds 0..draws-1) per
micro-batch. Per signal and loss it prints

- bytes per token of the signal on the wire (what a cache stores before its per-sample headers),
- the loss's relative bias (estimate - exact) / exact, mean and standard deviation over
  micro-batches (and draws),
- the cosine and the relative error ||g - g*|| / ||g*|| of the gradient against the exact one,
  mean and minimum / maximum over micro-batches (and draws).

    python benchmarks/teacher_signals.py                         # 2 global batches, kl and rkl
    python benchmarks/teacher_signals.py --steps 4 --draws 4 --losses kl,rkl,jsd --json out.json
    python benchmarks/teacher_signals.py --losses rkl --only sampled --proposal-temperature 2

With ``--train`` it also trains the default job (``--train-steps`` steps, all by default) once per
signal of :data:`TRAINED` and evaluates each final student **exactly** (a second, hidden-state
build of the default job with that student: held-out KL, CE, bits per byte, ECE), since a run on a
sparse signal can only report its own estimate of the KL.

    python benchmarks/teacher_signals.py --losses kl --train
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

TOPK = (1, 8, 32, 128)
SAMPLED = (4, 12, 32)


def signal_configs(proposal_temperature: float = 1.0):
    """(label, SignalConfig or None for hidden) for every signal of the table."""
    from kdlib.config import SignalConfig, SignalKind

    yield "hidden (bf16)", None
    for tail in (True, False):
        for k in TOPK:
            yield f"topk k={k} {'tail' if tail else 'no tail'}", SignalConfig(kind=SignalKind.topk, k=k, tail_mass=tail)
    suffix = "" if proposal_temperature == 1.0 else f" T={proposal_temperature:g}"
    for k in SAMPLED:
        yield f"sampled k={k}{suffix}", SignalConfig(kind=SignalKind.sampled, k=k, proposal_temperature=proposal_temperature)


def scored_batches(steps: int, run_dir: Path):
    """(teacher output, teacher head, student hidden states, student head) per micro-batch."""
    import kdlib
    from kdlib.models.forward import hidden_at_loss_positions
    from kdlib.models.head import lm_head_of
    from kdlib.runner import built

    cfg = kdlib.compose(["device=cpu", "logging.progress=false", "eval.before=false", "save_student=false",
                         "student.autocast=false", f"train.max_steps={steps}"])
    out = []
    with built(cfg, run_dir=run_dir) as mode:
        pipeline = mode.pipeline
        teacher = pipeline.teacher.group.workers[0]
        student = pipeline.students.group.workers[0]
        t_head = teacher.backend.lm_head().detached(device="cpu")
        s_head = lm_head_of(student.model)
        s_head = replace(s_head, weight=s_head.weight.detach().float().clone())
        batches = mode.sample_batches()
        for _ in range(steps):
            _, micro = pipeline.data.step_batches(next(batches), pipeline.cfg.train, pipeline.students.size)
            for batch in micro:
                output = teacher.score(batch)
                with torch.no_grad():
                    hidden = hidden_at_loss_positions(student.model, batch.student).float()
                out.append((output, t_head, hidden, s_head, batch.teacher_keys))
    return cfg, out


# (label, overrides) of the signals the default job is trained on with --train.
TRAINED = [
    ("hidden (exact)", []),
    ("topk k=8 tail", ["teacher.signal.kind=topk", "teacher.signal.k=8"]),
    ("topk k=32 tail", ["teacher.signal.kind=topk", "teacher.signal.k=32"]),
    ("topk k=32 no tail", ["teacher.signal.kind=topk", "teacher.signal.k=32", "teacher.signal.tail_mass=false"]),
    ("sampled k=12", ["teacher.signal.kind=sampled", "teacher.signal.k=12"]),
]


def train_and_evaluate(steps: int | None, out: Path) -> list[dict]:
    """Train the default job on each signal of TRAINED, then evaluate its student exactly."""
    import kdlib
    from kdlib.runner import built

    base = ["device=cpu", "logging.progress=false", "eval.before=false", "save_student=true", "save_dtype=float32"]
    if steps:
        base.append(f"train.max_steps={steps}")
    rows = []
    for label, overrides in TRAINED:
        name = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        result = kdlib.run(kdlib.compose(base + overrides + [f"output_dir={out / name}"]))
        # the trained student, evaluated against the teacher's hidden states (exact KL)
        exact = kdlib.compose(["device=cpu", "logging.progress=false", f"student.model={result.student_dir}",
                               "student.num_layers=null", f"output_dir={out / (name + '_eval')}"])
        with built(exact, run_dir=out / (name + "_eval")) as mode:
            metrics = mode.evaluate()
        seconds = sum(json.loads(line).get("teacher_seconds", 0.0)
                      for line in (result.run_dir / "metrics.jsonl").read_text().splitlines())
        rows.append({"signal": label, "steps": result.metrics.get("step"), "teacher_seconds": seconds, **metrics})
        print(f"{label:22}" + "".join(f"{k}={metrics[k]:.4f} " for k in ("kl", "ce", "bits_per_byte", "ece")), flush=True)
    return rows


def loss_and_grad(fn):
    """(loss value, flattened gradient of hidden states and head weight) of a loss closure."""
    value, leaves = fn()
    grads = torch.autograd.grad(value, leaves)
    return float(value.detach()), torch.cat([g.reshape(-1).double() for g in grads])


def main() -> None:
    from kdlib.config import LossConfig
    from kdlib.losses import distillation_loss
    from kdlib.losses.estimators import signal_support
    from kdlib.losses.registry import LOSSES
    from kdlib.losses.sparse import signal_distillation_loss
    from kdlib.hardware import bf16_support, cpu_capability
    from kdlib.signals import sample_seed, signal_from_hidden

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="global batches of the default job")
    parser.add_argument("--draws", type=int, default=3, help="independent draws per micro-batch (sampled)")
    parser.add_argument("--losses", default="kl,rkl")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--train", action="store_true", help="also train the default job on each signal")
    parser.add_argument("--train-steps", type=int, default=None, help="steps per training run (default: the job's)")
    parser.add_argument("--skip-static", action="store_true", help="only the training part")
    parser.add_argument("--proposal-temperature", type=float, default=1.0, help="sampled: the proposal's temperature")
    parser.add_argument("--only", default="", help="only the signals whose label starts with this (e.g. sampled)")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    results: dict = {}
    if args.train:
        with tempfile.TemporaryDirectory(prefix="kdlib-signals-train-") as tmp:
            results["trained"] = train_and_evaluate(args.train_steps, Path(tmp))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    if args.skip_static:
        return

    with tempfile.TemporaryDirectory(prefix="kdlib-signals-") as tmp:
        cfg, batches = scored_batches(args.steps, Path(tmp))
    rows = sum(b[0].n_rows for b in batches)
    print(f"CPU: {cpu_capability()}, native bf16: {bf16_support('cpu').native}; teacher {cfg.teacher.model} "
          f"({cfg.teacher.dtype.value}), {len(batches)} micro-batches, {rows} loss tokens, chunk {cfg.loss.chunk_size}")

    results["static"] = []
    for loss_name in args.losses.split(","):
        loss_cfg = LOSSES.entry(loss_name).config_cls(name=loss_name, chunk_size=cfg.loss.chunk_size)
        assert isinstance(loss_cfg, LossConfig)
        exact = []
        for output, t_head, hidden, s_head, _ in batches:
            def fn(output=output, t_head=t_head, hidden=hidden, s_head=s_head):
                h, w = hidden.clone().requires_grad_(True), s_head.weight.clone().requires_grad_(True)
                head = replace(s_head, weight=w)
                terms = distillation_loss(h, head, output.hidden, t_head, None, loss_cfg, kd_weight=1.0, ce_weight=0.0,
                                          normaliser=float(h.shape[0]))
                return terms.loss, (h, w)
            exact.append(loss_and_grad(fn))
        print(f"\nloss={loss_name}: exact mean per-token loss {statistics.mean(v for v, _ in exact):.4f}")
        print(f"{'signal':22}{'B/token':>9}{'bias mean':>11}{'bias sd':>9}{'cos mean':>10}{'cos min':>9}"
              f"{'rel err':>9}{'rel max':>9}")
        for label, signal in signal_configs(args.proposal_temperature):
            if signal is not None and signal_support(loss_name, signal.kind.value, {}, signal.k):
                continue
            if not label.startswith(args.only) and signal is not None:
                continue
            biases, cosines, errors, nbytes = [], [], [], []
            draws = args.draws if signal is not None and signal.kind.value == "sampled" else 1
            for (output, t_head, hidden, s_head, keys), (value, grad) in zip(batches, exact):
                for draw in range(draws):
                    sent = output
                    if signal is not None:
                        signal.seed = draw
                        seeds = None if keys is None else [sample_seed(draw, key) for key in keys]
                        sent = signal_from_hidden(output, t_head, signal, wire_dtype=output.hidden.dtype,
                                                  chunk_size=cfg.loss.chunk_size, seeds=seeds,
                                                  generator=torch.Generator().manual_seed(draw))
                    fields = {k: v for k, v in sent.to_parts()[0].items() if k not in ("row_offsets", "sample_ids")}
                    nbytes.append(sum(t.numel() * t.element_size() for t in fields.values()) / sent.n_rows)

                    def fn(sent=sent, hidden=hidden, s_head=s_head, t_head=t_head):
                        h, w = hidden.clone().requires_grad_(True), s_head.weight.clone().requires_grad_(True)
                        head = replace(s_head, weight=w)
                        if sent.signal == "hidden":
                            terms = distillation_loss(h, head, sent.hidden, t_head, None, loss_cfg, kd_weight=1.0,
                                                      ce_weight=0.0, normaliser=float(h.shape[0]))
                        else:
                            terms = signal_distillation_loss(h, head, sent, None, loss_cfg, kd_weight=1.0,
                                                             ce_weight=0.0, normaliser=float(h.shape[0]))
                        return terms.loss, (h, w)
                    est, g = loss_and_grad(fn)
                    biases.append((est - value) / value)
                    cosines.append(float(torch.dot(g, grad) / (g.norm() * grad.norm())))
                    errors.append(float((g - grad).norm() / grad.norm()))
            if not all(math.isfinite(b) for b in biases):  # (reverse KL against a truncated teacher)
                results["static"].append({"loss": loss_name, "signal": label, "bytes_per_token": statistics.mean(nbytes),
                                          "bias_mean": math.inf})
                print(f"{label:22}{statistics.mean(nbytes):9.0f}{'inf':>11}")
                continue
            row = {
                "loss": loss_name, "signal": label, "bytes_per_token": statistics.mean(nbytes),
                "bias_mean": statistics.mean(biases), "bias_sd": statistics.pstdev(biases),
                "cos_mean": statistics.mean(cosines), "cos_min": min(cosines),
                "rel_err_mean": statistics.mean(errors), "rel_err_max": max(errors), "n": len(biases),
            }
            results["static"].append(row)
            print(f"{label:22}{row['bytes_per_token']:9.0f}{row['bias_mean']:+11.4f}{row['bias_sd']:9.4f}"
                  f"{row['cos_mean']:10.4f}{row['cos_min']:9.4f}{row['rel_err_mean']:9.4f}{row['rel_err_max']:9.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
