"""Pruning candidates for the default job's student, each distilled with the default job as judge.

Scores the embedded teacher (SmolLM2-135M-Instruct) once on calibration tokens from the default
job's training data (kdlib.pruning: activations, drop-one layer KL, greedy KL), builds every
candidate at the default student's parameter budget (the teacher depth-pruned to 16 of 30 layers)
from those scores, then runs the default job on each (``python -m kdlib student.model=<dir>
student.num_layers=null``, one fresh process per candidate, same data and steps) and prints a table:
parameters, held-out KL(teacher || student), top-1 agreement and bits per byte before and after
KD, and the job's wall-clock time. The scoring time (wall and process CPU) is printed once.

    python benchmarks/pruning.py [--candidates NAME ...] [--root DIR] [--reuse] [--json out.json]
                                 [--threads N] [--tag T] [--build-only] [-- kdlib overrides for every job, e.g. train.lr=1e-3]

``--reuse`` keeps candidates and finished runs already in ``--root`` (a long search can resume).
Held-out metrics do not depend on the machine's load; wall-clock times do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from kdlib.pruning import DepthMethod, PruneConfig, WidthFit

DEPTH = 16  # the default student keeps 16 of the teacher's 30 layers

# name -> PruneConfig (params=None: filled with the default student's parameter count)
CANDIDATES: dict[str, PruneConfig] = {
    "evenly": PruneConfig(num_layers=DEPTH, depth=DepthMethod.evenly),
    "last_span": PruneConfig(num_layers=DEPTH, depth=DepthMethod.last_span),
    "block_influence": PruneConfig(num_layers=DEPTH, depth=DepthMethod.block_influence),
    "angular": PruneConfig(num_layers=DEPTH, depth=DepthMethod.angular),
    "layer_kl": PruneConfig(num_layers=DEPTH, depth=DepthMethod.layer_kl),
    "greedy_kl": PruneConfig(num_layers=DEPTH, depth=DepthMethod.greedy_kl),
    # width only (Minitron): all 30 layers, MLP channels solved for the budget
    "width_mlp": PruneConfig(fit=WidthFit.intermediate_size),
    # width only: hidden 576 -> 504 (9 x 56; embeddings shrink too), MLP solved
    "width_hidden_mlp": PruneConfig(hidden_size=504, fit=WidthFit.intermediate_size),
    # depth + width: fewer layers dropped (greedy KL), MLP solved
    "greedy_kl_24_mlp": PruneConfig(num_layers=24, depth=DepthMethod.greedy_kl, fit=WidthFit.intermediate_size),
    "greedy_kl_20_mlp": PruneConfig(num_layers=20, depth=DepthMethod.greedy_kl, fit=WidthFit.intermediate_size),
    "greedy_kl_18_mlp": PruneConfig(num_layers=18, depth=DepthMethod.greedy_kl, fit=WidthFit.intermediate_size),
    # depth + heads: 20 layers, 6 of 9 query heads (2 per KV group), MLP solved
    "greedy_kl_20_heads_mlp": PruneConfig(num_layers=20, depth=DepthMethod.greedy_kl, num_attention_heads=6,
                                          fit=WidthFit.intermediate_size),
}
# Every candidate's scores come from one scoring with these options (greedy KL down to DEPTH).
SCORING = PruneConfig(num_layers=DEPTH, depth=DepthMethod.greedy_kl, calibration_tokens=2048, kl_tokens=512)


def calibration_rows(overrides: list[str]):
    """The default job's teacher location, tokenizer and training samples' token ids."""
    import kdlib
    from kdlib.data.encoding import ChatEncoder
    from kdlib.data.samples import build_samples
    from kdlib.models.loading import load_tokenizer, model_location

    cfg = kdlib.compose(overrides)
    tokenizer = load_tokenizer(cfg.teacher)
    samples, _ = build_samples(cfg.data, "train", ChatEncoder(tokenizer))
    return model_location(cfg.teacher.model), tokenizer, [s.student.input_ids for s in samples]


def build_candidates(names: list[str], root: Path, reuse: bool) -> dict:
    """Score the teacher once and save every candidate under root/<name>/model."""
    from kdlib.pruning import load_source, parameter_budget, prune_to_directory
    from kdlib.pruning.calibration import select_calibration
    from kdlib.pruning.importance import compute_scores
    from kdlib.pruning.report import load_scores, save_scores

    location, tokenizer, rows = calibration_rows([])
    source = load_source(location)
    budget = parameter_budget(source, DEPTH)
    info = {"budget": budget, "params_teacher": sum(p.numel() for p in source.parameters())}
    if reuse and (root / "scores.json").is_file():
        scores = load_scores(root)
    else:
        calibration = select_calibration(rows, SCORING.calibration_tokens, SCORING.seed)
        scores = compute_scores(source, calibration, SCORING, n_drop=source.config.num_hidden_layers - DEPTH)
        save_scores(scores, root, config=SCORING.as_dict())
    info["scoring_seconds"] = scores.seconds
    info["candidates"] = {}
    for name in names:
        cfg = CANDIDATES[name]
        if cfg.num_layers is None or cfg.num_layers != DEPTH:
            cfg = replace(cfg, params=budget)
        directory = root / name / "model"
        if reuse and (directory / "prune.json").is_file():
            result = json.loads((directory / "prune.json").read_text())
        else:
            result = prune_to_directory(source, tokenizer, rows, cfg, directory, scores=scores).as_dict()
        info["candidates"][name] = {"config": cfg.as_dict(), "params": result["params_after"],
                                    "sizes": result["sizes_after"], "layers": result["plan"]["layers"]}
    return info


def distil(name: str, root: Path, overrides: list[str], threads: int, reuse: bool, tag: str = "") -> dict:
    """The default job on candidate ``name``: held-out metrics before/after and wall time."""
    run_dir, summary_file = root / name / f"run{tag}", root / name / f"summary{tag}.json"
    if reuse and summary_file.is_file():
        return json.loads(summary_file.read_text())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    args = [sys.executable, "-m", "kdlib", f"student.model={root / name / 'model'}", "student.num_layers=null",
            "logging.progress=false", f"hydra.run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    evaluation = json.loads((run_dir / "eval.json").read_text())
    summary = {"before": evaluation["before"], "after": evaluation["after"], "job_seconds": time.perf_counter() - start,
               "command": " ".join(args[1:])}
    summary_file.write_text(json.dumps(summary, indent=1))
    return summary


def table(info: dict, results: dict) -> str:
    lines = ["| candidate | params | layers | MLP | hidden | heads | KL before | after | top-1 before | after | "
             "bpb before | after | job s |", "|" + " --- |" * 13]
    for name, res in results.items():
        cand = info["candidates"][name]
        sizes, before, after = cand["sizes"], res["before"], res["after"]
        lines.append(
            f"| {name} | {cand['params'] / 1e6:.2f}M | {sizes['num_layers']} | {sizes['intermediate_size']} | "
            f"{sizes['hidden_size']} | {sizes['num_attention_heads']}/{sizes['num_key_value_heads']} | "
            f"{before['kl']:.3f} | **{after['kl']:.3f}** | {before['top1_agreement']:.1%} | "
            f"**{after['top1_agreement']:.1%}** | {before['bits_per_byte']:.3f} | {after['bits_per_byte']:.3f} | "
            f"{res['job_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--root", type=Path, default=Path("outputs/bench_pruning"))
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the KD jobs (0: torch's default)")
    parser.add_argument("--tag", default="", help="suffix of the run directories (runs with other overrides)")
    parser.add_argument("--build-only", action="store_true", help="score and build the candidates, distil none")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="kdlib overrides for every job (after --)")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}; {os.cpu_count()} cores; load average {os.getloadavg()}; {time.strftime('%Y-%m-%d')}")
    info = build_candidates(args.candidates, args.root, args.reuse)
    seconds = info["scoring_seconds"]
    print(f"budget {info['budget']:,} parameters (teacher {info['params_teacher']:,}); scoring (wall / CPU s): "
          + ", ".join(f"{k.removesuffix('_wall')} {seconds[k]:.1f} / {seconds[k.replace('_wall', '_cpu')]:.1f}"
                      for k in seconds if k.endswith("_wall")))
    for name, cand in info["candidates"].items():
        print(f"{name}: {cand['params']:,} parameters, sizes {cand['sizes']}, layers {cand['layers']}")
    if args.build_only:
        return
    results = {}
    for name in args.candidates:
        results[name] = distil(name, args.root, args.overrides, args.threads, args.reuse, args.tag)
        print(f"{name}: KL {results[name]['after']['kl']:.3f}, top-1 {results[name]['after']['top1_agreement']:.1%}",
              flush=True)
    print(table(info, results))
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
