"""KD loss from hidden states, forward + backward: the naive full-logit path against the fused one.

The naive path materialises the student's and the teacher's [N, V] logits, then applies the
divergence with autograd, as KDFlow and TRL's GKD trainer do (it is kdlib's
``implementation=naive`` reference path). The fused path is kdlib's default
(``implementation=fused``), chunked over tokens. Both run on the same inputs (same seed), through
``kdlib.losses.distillation_loss``, and the script prints time, peak extra memory, their ratios
and the two loss values (which must agree).

Memory method. CPU: each path runs in a fresh subprocess; after the inputs are built and a small
warm-up has run, the child records its resident set size (VmRSS) and resets the kernel's
high-water mark (writing 5 to /proc/self/clear_refs), then runs forward + backward and reads
VmHWM. Peak extra memory = VmHWM - VmRSS before the step: everything the step allocates,
gradients included. If clear_refs cannot be written, a thread samples VmRSS every 2 ms instead.
CUDA: one process, torch.cuda.max_memory_allocated() minus the memory allocated before the step.

    python benchmarks/kd_loss.py --n 2048                      # CPU, float32, both paths
    python benchmarks/kd_loss.py --n 4096 --skip-naive         # naive does not fit in 24 GB
    python benchmarks/kd_loss.py --device cuda --dtype bfloat16 --hidden 4096 --vocab 128256 --n 8192
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import torch

from kdlib.config.schema import LossImplementation
from kdlib.losses import LOSSES, distillation_loss
from kdlib.models.head import LMHead

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GIB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048, help="loss tokens")
    p.add_argument("--hidden", type=int, default=1024, help="student hidden size")
    p.add_argument("--teacher-hidden", type=int, default=None,
                   help="teacher hidden size (default: --hidden)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size of both heads")
    p.add_argument("--loss", default="jsd", help=f"registered loss: {', '.join(LOSSES.names())}")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and hidden states")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk of the fused path")
    p.add_argument("--skip-naive", action="store_true", help="run the fused path only")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default: 1 on CPU, 10 on CUDA)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", choices=["naive", "fused"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.teacher_hidden = args.teacher_hidden or args.hidden
    if args.repeats is None:
        args.repeats = 10 if args.device.startswith("cuda") else 1
    return args


def make_inputs(args, n=None, vocab=None):
    """Hidden states and heads whose logits have a standard deviation of about 2.5."""
    n = n or args.n
    vocab = vocab or args.vocab
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    student = LMHead(weight=rand(vocab, args.hidden, std=2.5 / args.hidden**0.5).requires_grad_(True))
    teacher = LMHead(weight=rand(vocab, args.teacher_hidden, std=2.5 / args.teacher_hidden**0.5))
    hidden = rand(n, args.hidden).requires_grad_(True)
    teacher_hidden = rand(n, args.teacher_hidden)
    return hidden, student, teacher_hidden, teacher


def step(args, path, hidden, student, teacher_hidden, teacher) -> float:
    """One forward + backward of the KD loss; returns the loss value."""
    cfg = LOSSES.entry(args.loss).config_cls(
        implementation=LossImplementation(path), chunk_size=args.chunk_size, temperature=args.temperature
    )
    terms = distillation_loss(
        hidden, student, teacher_hidden, teacher, None, cfg,
        kd_weight=1.0, ce_weight=0.0, normaliser=float(hidden.shape[0]),
    )
    terms.loss.backward()
    return terms.loss.detach().item()


# ---------------------------------------------------------------------------------------------
# CPU: one subprocess per path, peak RSS


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _PeakRss:
    """Peak resident set size from here on: the kernel's high-water mark, or a sampling thread."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after clear_refs"
            self._thread = None
        except OSError:
            self.method = "VmRSS sampled every 2 ms"
            self._peak = _proc_status_kib("VmRSS")
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _proc_status_kib("VmRSS"))
            time.sleep(0.002)

    def peak_kib(self) -> int:
        if self._thread is None:
            return _proc_status_kib("VmHWM")
        self._stop.set()
        self._thread.join()
        return max(self._peak, _proc_status_kib("VmRSS"))


def run_child(args) -> dict:
    """Inside the subprocess: warm up small, then measure one path on the full inputs."""
    import gc

    step(args, args.child, *make_inputs(args, n=16, vocab=1000))  # load kernels, fill caches
    inputs = make_inputs(args)
    times, value, peak_extra, method = [], None, 0, None
    for _ in range(args.repeats):
        hidden, student = inputs[0], inputs[1]
        hidden.grad = None
        student.weight.grad = None
        gc.collect()
        base = _proc_status_kib("VmRSS")
        meter = _PeakRss()
        start = time.perf_counter()
        value = step(args, args.child, *inputs)
        times.append(time.perf_counter() - start)
        peak_extra = max(peak_extra, meter.peak_kib() - base)
        method = meter.method
    return {"time_s": statistics.median(times), "peak_extra_gib": peak_extra * 1024 / GIB,
            "loss": value, "memory_method": method}


def run_cpu_path(args, path: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path]
    for key in ("n", "hidden", "teacher_hidden", "vocab", "loss", "temperature", "dtype", "device",
                "chunk_size", "repeats"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        reason = "killed (out of memory?)" if done.returncode < 0 else done.stderr.strip()[-2000:]
        return {"error": f"exit {done.returncode}: {reason}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# CUDA: one process, allocator statistics


def run_cuda_path(args, path: str, inputs) -> dict:
    step(args, path, *make_inputs(args, n=16, vocab=1000))
    hidden, student = inputs[0], inputs[1]
    times, value, peak_extra = [], None, 0
    for i in range(args.repeats + 1):  # the first run is a warm-up
        hidden.grad = None
        student.weight.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        value = step(args, path, *inputs)
        torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - start)
        peak_extra = max(peak_extra, torch.cuda.max_memory_allocated() - base)
    return {"time_s": statistics.median(times), "peak_extra_gib": peak_extra / GIB, "loss": value,
            "memory_method": "torch.cuda.max_memory_allocated"}


# ---------------------------------------------------------------------------------------------


def machine() -> str:
    if torch.cuda.is_available() and torch.cuda.device_count():
        gpu = torch.cuda.get_device_name(0)
    else:
        gpu = "no GPU"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    paths = ["fused"] if args.skip_naive else ["naive", "fused"]
    results = {}
    if args.device.startswith("cuda"):
        inputs = make_inputs(args)
        for path in paths:
            results[path] = run_cuda_path(args, path, inputs)
    else:
        for path in paths:
            results[path] = run_cpu_path(args, path)

    print(f"KD loss forward + backward | loss={args.loss} N={args.n} H={args.hidden} "
          f"Ht={args.teacher_hidden} V={args.vocab} {args.dtype} {args.device} "
          f"chunk={args.chunk_size} repeats={args.repeats}")
    print(f"machine: {machine()} | {datetime.date.today().isoformat()}")
    print(f"{'path':<8}{'time (s)':>12}{'peak extra (GiB)':>20}{'loss':>16}")
    for path, r in results.items():
        if "error" in r:
            print(f"{path:<8}  failed: {r['error']}")
        else:
            print(f"{path:<8}{r['time_s']:>12.3f}{r['peak_extra_gib']:>20.3f}{r['loss']:>16.7f}")
    if args.skip_naive:
        # Measured at N=2048: about 8.3 MiB per token (V=151936, float32) plus the weight gradient.
        print("naive   skipped (--skip-naive): it holds several float32 [N, V] tensors at once")
    naive, fused = results.get("naive", {}), results.get("fused", {})
    if "time_s" in naive and "time_s" in fused:
        diff = abs(naive["loss"] - fused["loss"]) / abs(naive["loss"])
        print(f"{'naive/fused':<8}{naive['time_s'] / fused['time_s']:>11.2f}x"
              f"{naive['peak_extra_gib'] / fused['peak_extra_gib']:>19.2f}x"
              f"  loss rel. diff {diff:.1e}")
    methods = {r.get("memory_method") for r in results.values() if "memory_method" in r}
    print(f"memory: {', '.join(sorted(methods))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
