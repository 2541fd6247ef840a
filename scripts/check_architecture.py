"""The architecture's measurable goals, checked: module size, backend isolation, modules per step.

    python scripts/check_architecture.py lines          # modules of src/kdlib over 400 lines
    python scripts/check_architecture.py isolation      # modules outside the SGLang backend naming it
    python scripts/check_architecture.py trace offpolicy|onpolicy [--all]

``trace`` builds a tiny run (random Llama, a small tokenizer, chats: built in a temporary directory,
nothing downloaded), steps it once untraced (so one-time set-up is not counted) and then traces one
more optimizer step with ``sys.setprofile``, listing the modules of src/kdlib whose functions ran,
in the order the step first entered them. It counts the modules a reader follows: the *stations*
of the step, leaving out (unless ``--all``) modules entered only from third-party code (an attention
implementation that transformers calls back) and modules whose executed code is only the plumbing
of a typed value (a dataclass's generated methods, ``__post_init__``, properties). Both counts are
printed. docs/architecture.md walks the same steps module by module.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "kdlib"
LIMIT = 400
BACKEND = SRC / "backends" / "sglang"


def long_modules() -> list[tuple[str, int]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > LIMIT:
            out.append((str(path.relative_to(SRC)), n))
    return out


def modules_naming_sglang() -> list[str]:
    """Modules of src/kdlib outside the SGLang backend package whose text names SGLang."""
    return [
        str(path.relative_to(SRC)) for path in sorted(SRC.rglob("*.py"))
        if BACKEND not in path.parents and re.search("sglang", path.read_text(encoding="utf-8"), re.IGNORECASE)
    ]


def _tiny_run(directory: Path, mode: str):
    from kdlib.demo.text import build_model, build_tokenizer, chat_rows, write_jsonl

    build_tokenizer(directory / "tok")
    build_model(directory / "llama", arch="llama", tokenizer_dir=directory / "tok", num_layers=4)
    train = write_jsonl(directory / "train.jsonl", chat_rows(24, seed=0))
    held_out = write_jsonl(directory / "eval.jsonl", chat_rows(8, seed=1))
    overrides = [
        f"teacher.model={directory / 'llama'}", f"student.model={directory / 'llama'}", "student.num_layers=2",
        f"data.train={train}", f"data.eval={held_out}", "logging.progress=false", "device=cpu", "train.max_steps=4",
    ]
    if mode == "onpolicy":
        overrides += ["+recipe=onpolicy", "rollout.max_new_tokens=8"]
    import kdlib

    return kdlib.compose(overrides)


def trace_step(mode: str) -> list[tuple[str, str]]:
    """(module, kind) in order of first entry during one step; kind is 'station', 'value' or
    'callback' (see the module docstring)."""
    from kdlib.runner import built

    entered: dict[str, dict] = {}

    def profile(frame, event, arg):
        if event != "call":
            return
        filename = frame.f_code.co_filename
        if not filename.startswith(str(SRC)):
            return
        name = str(Path(filename).relative_to(SRC))
        info = entered.setdefault(name, {"kinds": set(), "from_kdlib": False})
        caller = frame.f_back
        if caller is not None and caller.f_code.co_filename.startswith(str(SRC)):
            info["from_kdlib"] = True
        code = frame.f_code.co_name
        plumbing = code.startswith("__") and code.endswith("__") or _is_property(frame)
        info["kinds"].add("value" if plumbing else "code")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _tiny_run(Path(tmp), mode)
        with built(cfg, run_dir=Path(tmp) / "run") as loop:
            loop.resume()
            loop.start(1)
            batches = loop.sample_batches()
            loop.step(next(batches), 1)  # first step: one-time set-up (engines, caches, kernels)
            samples = next(batches) if mode == "offpolicy" else None
            sys.setprofile(profile)
            try:
                if samples is None:
                    samples = next(batches)  # the on-policy step begins with its rollouts
                loop.step(samples, 2)
            finally:
                sys.setprofile(None)
    out = []
    for name, info in entered.items():
        if not info["from_kdlib"]:
            kind = "callback"
        elif info["kinds"] == {"value"}:
            kind = "value"
        else:
            kind = "station"
        out.append((name, kind))
    return out


def _is_property(frame) -> bool:
    owner = frame.f_locals.get("self")
    attr = getattr(type(owner), frame.f_code.co_name, None) if owner is not None else None
    return isinstance(attr, property)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("lines")
    sub.add_parser("isolation")
    trace = sub.add_parser("trace")
    trace.add_argument("mode", choices=["offpolicy", "onpolicy"])
    trace.add_argument("--all", action="store_true", help="count every module whose code ran")
    args = parser.parse_args(argv)
    if args.what == "lines":
        found = long_modules()
        for name, n in found:
            print(f"{n:5d}  {name}")
        print(f"{len(found)} module(s) over {LIMIT} lines")
        return 1 if found else 0
    if args.what == "isolation":
        found = modules_naming_sglang()
        for name in found:
            print(name)
        print(f"{len(found)} module(s) outside backends/sglang name SGLang")
        return 1 if found else 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    modules = trace_step(args.mode)
    stations = [name for name, kind in modules if kind == "station"]
    for name, kind in modules:
        print(f"  {kind:8s} {name}")
    print(f"one {args.mode} step: {len(stations)} stations, {len(modules)} modules with code that ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
