"""Rollout-train agreement on the default on-policy job, per engine and precision, and what it costs.

Part 1 runs ``kdlib +recipe=onpolicy`` (the embedded SmolLM2 teacher, the pruned default student,
shipped prompts) for ``--steps`` steps under each setting of ``--settings`` and prints the mean
and largest per-step ``rollout_k3`` (k3 estimate of KL(engine || trainer) over the sampled tokens)
and the largest ``rollout_logprob_max_abs_diff`` from metrics.jsonl. The settings:

- ``bf16``: the default job as resolved on this machine (student autocast bf16 where the CPU has
  native bf16; the rollout engine computes in float32);
- ``fp32``: ``student.autocast=false``: trainer and engine both float32 (``rollout.engine=auto``,
  the eager static-cache engine);
- ``generate``, ``compiled``, ``frozen``: fp32 with that ``rollout.engine``.

Part 2 (``--cost``) times the rollout backend's ``generate`` on the same prompts with and without
the sampled tokens' log-probabilities (the engine's one extra log-softmax per decode step),
interleaved, and prints the ratio; the trainer's side costs nothing at temperature 1 (the loss
engine's cross-entropy rows are those log-probabilities).

    python benchmarks/rollout_agreement.py                                # all settings, 3 steps each
    python benchmarks/rollout_agreement.py --settings bf16,fp32 --steps 2
    python benchmarks/rollout_agreement.py --settings '' --cost            # only the decode cost
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kdlib

SETTINGS = {
    "bf16": [],
    "fp32": ["student.autocast=false"],
    "generate": ["student.autocast=false", "rollout.engine=generate"],
    "compiled": ["student.autocast=false", "rollout.engine=compiled"],
    "frozen": ["student.autocast=false", "rollout.engine=frozen"],
}
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="bf16,fp32,generate,compiled,frozen")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cost", action="store_true", help="also time decoding with and without log-probabilities")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def agreement(setting: str, steps: int, root: Path) -> dict[str, float]:
    cfg = kdlib.compose(["+recipe=onpolicy", f"train.max_steps={steps}", "eval.before=false",
                         "save_student=false", f"output_dir={root / setting}", *SETTINGS[setting]])
    start = time.perf_counter()
    result = kdlib.run(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout_k3" in r]
    return {
        "steps": len(rows), "k3_mean": statistics.fmean(r["rollout_k3"] for r in rows),
        "k3_max": max(r["rollout_k3"] for r in rows),
        "max_abs_diff": max(r["rollout_logprob_max_abs_diff"] for r in rows),
        "tokens": statistics.fmean(r["response_tokens_mean"] for r in rows), "seconds": time.perf_counter() - start,
    }


def decode_cost(repeats: int) -> dict[str, float]:
    """Seconds per generate call with and without log-probabilities (static engine, float32)."""
    from kdlib.backends.hf.options import HFRolloutConfig
    from kdlib.backends.hf.rollout import HFRolloutBackend
    from kdlib.runner import built

    cfg = kdlib.compose(["+recipe=onpolicy", "student.autocast=false", "save_student=false"])
    with tempfile.TemporaryDirectory() as tmp, built(cfg, run_dir=Path(tmp)) as loop:
        prompts = [p.student_ids for p in loop.data.prompts[:4]]
        encoder = loop.data.student_encoder
        backend: HFRolloutBackend = loop.pipeline.rollout.group.workers[0].backend
        backend.cfg = HFRolloutConfig(max_new_tokens=96, temperature=1.0, batch_size=4)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats + 1):  # the first round warms the engine up
            for logprobs in (False, True):
                start = time.perf_counter()
                backend.generate(prompts, stop_ids=set(encoder.end_of_turn_ids), pad_id=encoder.pad_id, seed=0,
                                 logprobs=logprobs)
                times[logprobs].append(time.perf_counter() - start)
    without, with_ = statistics.median(times[False][1:]), statistics.median(times[True][1:])
    return {"without": without, "with": with_, "ratio": with_ / without}


def main(argv=None) -> None:
    args = parse_args(argv)
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split() if Path("/proc/cpuinfo").exists() else []
    print(f"# {datetime.date.today()} torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, flags {[f for f in FLAGS if f in flags]}")
    settings = [s for s in args.settings.split(",") if s]
    if settings:
        print(f"{'setting':<10} {'steps':>5} {'k3 mean':>10} {'k3 max':>10} {'max|diff|':>10} {'tokens':>7} {'s':>6}")
        with tempfile.TemporaryDirectory() as tmp:
            for setting in settings:
                r = agreement(setting, args.steps, Path(tmp))
                print(f"{setting:<10} {r['steps']:>5} {r['k3_mean']:>10.3g} {r['k3_max']:>10.3g} "
                      f"{r['max_abs_diff']:>10.3g} {r['tokens']:>7.1f} {r['seconds']:>6.0f}", flush=True)
    if args.cost:
        c = decode_cost(args.repeats)
        print(f"decode 4 prompts x 96 tokens: {c['without']:.2f} s without log-probabilities, {c['with']:.2f} s with "
              f"(x{c['ratio']:.3f})")


if __name__ == "__main__":
    main()
