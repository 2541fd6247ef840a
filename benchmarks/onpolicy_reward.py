"""KD alone vs reward alone vs reward + KD on the built-in arithmetic task, and the cost of groups.

Part 1 (``--seeds``): ``+recipe=onpolicy_reward`` (the whole SmolLM2 answering "What is a plus
b?", four samples per question, a privileged teacher that reads the exact reply) trained three
ways for the same number of steps, per seed:

- ``kd``: ``algorithm.reward_weight=0``: reverse KL alone (the rewards are computed and logged,
  not trained on; this is ``algorithm=vanilla`` bit for bit);
- ``reward``: ``algorithm=opd algorithm.teacher_weight=0 algorithm.reward_weight=1``: the
  policy-gradient term on the group-normalised task reward alone (the divergence is still logged);
- ``reward+kd``: ``algorithm.reward_weight=1``: reverse KL plus the policy-gradient term.

It reports per seed the held-out reward (the student's samples for the 32 data.eval questions,
rollout.n_samples_per_prompt each, a fixed seed) and the held-out KL(teacher || student) per
token on data.eval's reference replies, after training (and before, once per seed).

Part 2 (``--timing``): the cost of group sampling and advantages at the same number of sampled
tokens: 2 prompts x 4 samples against 8 prompts x 1 sample per step (same max_new_tokens), the
mean step time of each and the time spent computing rewards and advantages (``reward_seconds``)
as a share of the step.

    python benchmarks/onpolicy_reward.py [--seeds 1 2 3] [--steps 12] [--timing] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

ARMS = {
    "kd": ["algorithm.reward_weight=0"],
    "reward": ["algorithm=opd", "algorithm.teacher_weight=0", "algorithm.reward_weight=1"],
    "reward+kd": ["algorithm.reward_weight=1"],
}


def run(overrides: list[str], out: Path) -> tuple[dict, list[dict], float]:
    import kdlib

    cfg = kdlib.compose(["+recipe=onpolicy_reward", "save_student=false", "logging.progress=false",
                         f"output_dir={out}", *overrides])
    start = time.perf_counter()
    result = kdlib.run(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"before": result.eval_before, "after": result.eval_after}, rows, wall


def compare(seeds: list[int], steps: int, root: Path) -> list[dict]:
    results = []
    for seed in seeds:
        for n, (arm, overrides) in enumerate(ARMS.items()):
            before = "true" if n == 0 else "false"  # the same initial student for every arm of a seed
            evals, rows, wall = run([f"seed={seed}", f"train.max_steps={steps}", f"eval.before={before}", *overrides],
                                    root / f"seed{seed}_{arm.replace('+', '_')}")
            row = {
                "seed": seed, "arm": arm, "seconds": wall,
                "heldout_reward": evals["after"]["reward"], "heldout_kl": evals["after"]["kl"],
                "train_reward_first3": statistics.fmean(r["reward_mean"] for r in rows[:3]),
                "train_reward_last3": statistics.fmean(r["reward_mean"] for r in rows[-3:]),
                "train_kl_last3": statistics.fmean(r["kd_loss"] for r in rows[-3:]),
            }
            if evals["before"]:
                row["before_reward"], row["before_kl"] = evals["before"]["reward"], evals["before"]["kl"]
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def timing(steps: int, root: Path) -> list[dict]:
    out = []
    for name, overrides in {"2 prompts x 4 samples": ["rollout.n_samples_per_prompt=4"],
                            "8 prompts x 1 sample": ["rollout.n_samples_per_prompt=1"]}.items():
        _, rows, wall = run(["train.global_batch_size=8", f"train.max_steps={steps}", "eval.before=false",
                             "reward.eval_prompts=0", "data.eval=null", *overrides], root / name.replace(" ", "_"))
        measured = rows[1:]  # the first step includes warm-up
        step = statistics.fmean(r["step_seconds"] for r in measured)  # rollout, sync, teacher and students
        reward = statistics.fmean(r["reward_seconds"] for r in measured)
        out.append({"setup": name, "step_seconds": step, "reward_seconds": reward, "reward_share": reward / step,
                    "response_tokens_mean": statistics.fmean(r["response_tokens_mean"] for r in measured),
                    "rollout_seconds": statistics.fmean(r["rollout_seconds"] for r in measured)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--timing", action="store_true", help="also measure the cost of group sampling")
    parser.add_argument("--timing-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="kdlib-reward-bench-") as tmp:
        root = Path(tmp)
        report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "steps": args.steps, "comparison": compare(args.seeds, args.steps, root) if args.seeds else []}
        if args.timing:
            report["timing"] = timing(args.timing_steps, root)
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def print_report(report: dict) -> None:
    rows = report["comparison"]
    if rows:
        print(f"\n{report['steps']} steps per run; held-out after training (reward: higher is better, KL: lower)")
        print("| seed | arm | held-out reward | held-out KL | train reward (first 3 / last 3 steps) | seconds |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['seed']} | {r['arm']} | {r['heldout_reward']:.4f} | {r['heldout_kl']:.4f} | "
                  f"{r['train_reward_first3']:.3f} / {r['train_reward_last3']:.3f} | {r['seconds']:.0f} |")
        for seed in sorted({r["seed"] for r in rows}):
            arms = {r["arm"]: r for r in rows if r["seed"] == seed}
            if len(arms) == 3:
                better_reward = arms["reward+kd"]["heldout_reward"] > arms["kd"]["heldout_reward"]
                lower_kl = arms["reward+kd"]["heldout_kl"] < arms["reward"]["heldout_kl"]
                start = arms["kd"]
                print(f"seed {seed}: before training reward {start.get('before_reward', float('nan')):.4f}, "
                      f"KL {start.get('before_kl', float('nan')):.4f}; reward+kd reward > kd: {better_reward}; "
                      f"reward+kd KL < reward: {lower_kl}")
    for t in report.get("timing", []):
        print(f"{t['setup']}: step {t['step_seconds']:.2f} s (rollout {t['rollout_seconds']:.2f} s, "
              f"{t['response_tokens_mean']:.1f} tokens per response), rewards + advantages "
              f"{1000 * t['reward_seconds']:.2f} ms = {100 * t['reward_share']:.3f}% of the step")


if __name__ == "__main__":
    main()
