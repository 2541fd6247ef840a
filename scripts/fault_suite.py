"""The fault suite: bad inputs and faults injected into tiny runs, with what the user sees and what is kept.

    python scripts/fault_suite.py                   # print the table (about 10 minutes on 2 cores)
    python scripts/fault_suite.py --write docs/reliability.md   # and replace the table there
    python scripts/fault_suite.py --only sigterm    # probes whose name contains "sigterm"

Every probe runs the ``kdlib`` command line (as a user would) on tiny random models built in a
temporary directory, or, for the resume probes, compares a resumed run with an uninterrupted one
bit for bit. A row says what was injected, the last line the user saw (a ``kdlib: error:`` line,
or the end of a run that finished), whether a traceback was printed, and what was kept. A probe
whose outcome is not what reliability.md promises is marked FAIL and the script exits with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- fault-suite:start -->", "<!-- fault-suite:end -->"


@dataclass
class Row:
    probe: str
    injected: str
    sees: str
    traceback: bool
    kept: str
    ok: bool


class Workspace:
    """Tiny models and data in a temporary directory, and a way to run the CLI on them."""

    def __init__(self, root: Path) -> None:
        from kdlib.demo.text import build_model, build_tokenizer, chat_rows, write_jsonl

        self.root = root
        build_tokenizer(root / "tok")
        build_model(root / "llama", arch="llama", tokenizer_dir=root / "tok", num_layers=4)
        self.train = write_jsonl(root / "train.jsonl", chat_rows(24, seed=0))
        self.eval = write_jsonl(root / "eval.jsonl", chat_rows(8, seed=1))
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
        self.n = 0

    def overrides(self, **replace: str) -> list[str]:
        base = {
            "teacher.model": str(self.root / "llama"), "student.model": str(self.root / "llama"),
            "student.num_layers": "2", "student.autocast": "false", "teacher.dtype": "float32",
            "data.train": str(self.train), "data.eval": str(self.eval), "train.max_steps": "4",
            "logging.progress": "false", "device": "cpu", "eval.before": "false",
        }
        base.update(replace)
        return [f"{k}={v}" for k, v in base.items()]

    def run_dir(self, name: str) -> Path:
        self.n += 1
        return self.root / f"{self.n:02d}_{name}"

    def cli(self, args: list[str], run_dir: Path, *, env: dict | None = None, timeout: float = 900,
            wait_for: Callable[[], bool] | None = None, send: int | None = None) -> tuple[int, str]:
        """Run ``kdlib args`` in ``run_dir``; optionally send a signal once ``wait_for()`` holds."""
        place = [] if any(a.startswith("hydra.run.dir=") for a in args) else [f"hydra.run.dir={run_dir}"]
        command = [sys.executable, "-m", "kdlib", *args, *place]
        process = subprocess.Popen(command, cwd=self.root, env={**self.env, **(env or {})},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if wait_for is not None:
            deadline = time.monotonic() + timeout
            while not wait_for() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if process.poll() is None:
                process.send_signal(send)
        _, stderr = process.communicate(timeout=timeout)
        return process.returncode, stderr


def _seen(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("kdlib: error:")]
    return errors[-1] if errors else "(finished)"


def _one_line_error(ws: Workspace, probe: str, injected: str, args: list[str], expect: str, kept: str = "nothing to keep") -> Row:
    run_dir = ws.run_dir(probe)
    code, stderr = ws.cli(args, run_dir)
    seen = _seen(stderr)
    ok = code != 0 and "Traceback" not in stderr and re.search(expect, seen) is not None and \
        sum(line.startswith("kdlib: error:") for line in stderr.splitlines()) == 1
    return Row(probe, injected, seen, "Traceback" in stderr, kept, ok)


def _rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _same_student(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "student" / "model.safetensors"), load_file(b / "student" / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _same_rows(a: list[dict], b: list[dict]) -> bool:
    keys = ("step", "loss", "kd_loss", "ce_loss", "grad_norm", "lr")
    return [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


# ----------------------------------------------------------------------------------------------
# Probes


def bad_inputs(ws: Workspace) -> list[Row]:
    rows = []
    latin1 = ws.root / "latin1.jsonl"
    row = '{"messages": [{"role": "user", "content": "un caf\u00e9"}, {"role": "assistant", "content": "oui"}]}\n'
    latin1.write_bytes(ws.train.read_bytes() + row.encode("latin-1"))
    rows.append(_one_line_error(ws, "non_utf8_data", "a data file in Latin-1",
                                ws.overrides(**{"data.train": str(latin1)}), r"not UTF-8|UTF-8"))
    broken = ws.root / "truncated_model"
    shutil.copytree(ws.root / "llama", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    rows.append(_one_line_error(ws, "truncated_weights", "model.safetensors cut to a third",
                                ws.overrides(**{"student.model": str(broken)}), re.escape(str(weights))))
    tok = ws.root / "broken_tokenizer"
    shutil.copytree(ws.root / "llama", tok)
    (tok / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    rows.append(_one_line_error(ws, "broken_tokenizer", "tokenizer.json cut short",
                                ws.overrides(**{"teacher.model": str(tok)}), r"tokenizer"))
    rows.append(_one_line_error(ws, "bad_key", "`trian.lr=1` (a typo)", ws.overrides() + ["+trian.lr=1"],
                                r"trian|unknown key|Could not"))
    (ws.root / "raising_plugin.py").write_text("raise RuntimeError('plugin bug')\n")
    rows.append(_one_line_error(ws, "raising_plugin", "a plugin that raises while imported",
                                ws.overrides() + ["plugins=[raising_plugin]"], r"plugins: importing 'raising_plugin'"))
    nan = ws.root / "nan_teacher"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ws.root / "llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(nan)
    AutoTokenizer.from_pretrained(ws.root / "llama").save_pretrained(nan)
    rows.append(_one_line_error(ws, "nan_teacher", "a teacher whose final norm is NaN",
                                ws.overrides(**{"teacher.model": str(nan), "eval.before": "true"}),
                                r"returned hidden states that are not finite"))
    return rows


def bad_steps(ws: Workspace) -> list[Row]:
    run_dir = ws.run_dir("skipped_steps")
    args = ws.overrides(**{"train.max_steps": "6"}) + ["plugins=[fault_plugins]", "algorithm=fault_injection",
                                                       "algorithm.nan_samples=[5]"]
    code, stderr = ws.cli(args, run_dir)
    seen = _seen(stderr)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    ok = code == 2 and "max_skipped_fraction" in seen and bool(checkpoints) and "Traceback" not in stderr
    return [Row("nan_steps", "a NaN loss in one sample (once per epoch)", seen, "Traceback" in stderr,
                f"checkpoint {checkpoints[-1] if checkpoints else '(none)'} of the last good step", ok)]


def sigterm(ws: Workspace, name: str, extra: list[str]) -> Row:
    """SIGTERM after two logged steps; the printed command resumes in the same directory; the run
    equals an uninterrupted one bit for bit (steps and final student)."""
    args = ws.overrides(**{"train.max_steps": "6"}) + extra + ["plugins=[fault_plugins]", "algorithm=fault_injection"]
    run_dir, reference = ws.run_dir(name), ws.run_dir(name + "_reference")
    code, stderr = ws.cli(args, run_dir, env={"KDLIB_TEST_STEP_SECONDS": "0.3"},
                          wait_for=lambda: len(_rows(run_dir)) >= 2, send=signal.SIGTERM)
    seen = _seen(stderr)
    command = shlex.split(seen.split("resume with: ", 1)[-1])
    resumed_code, resumed_err = ws.cli(command[1:], run_dir)
    ws.cli(args, reference)
    same = resumed_code == 0 and _same_rows(_rows(run_dir), _rows(reference)) and _same_student(run_dir, reference)
    ok = code == 128 + signal.SIGTERM and same and "Traceback" not in stderr + resumed_err
    return Row(name, "SIGTERM in the middle of training, then the printed command",
               seen.split("; resume with")[0], "Traceback" in stderr + resumed_err,
               "checkpoint; the resumed run equals the uninterrupted one bit for bit" if same else "DIFFERENT", ok)


def cache_faults(ws: Workspace) -> list[Row]:
    rows = []
    cache = ws.root / "cache"
    fill = ws.run_dir("cache_fill")
    ws.cli(ws.overrides(**{"teacher.cache": str(cache)}), fill)
    shards = sorted((cache / "shards").glob("*.safetensors"))
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    flipped = bytearray(shards[1].read_bytes())
    flipped[-3] ^= 0xFF
    shards[1].write_bytes(bytes(flipped))
    run_dir = ws.run_dir("cache_damaged")
    code, stderr = ws.cli(ws.overrides(**{"teacher.cache": str(cache)}), run_dir)
    same = code == 0 and _same_rows(_rows(run_dir), _rows(fill))
    log = run_dir / "kdlib.log"  # warnings go to the log (and Hydra's stdout), not stderr
    warned = log.read_text(encoding="utf-8").count("is damaged") if log.exists() else 0
    rows.append(Row("damaged_cache", "a truncated and a bit-flipped shard", _seen(stderr) + " (warned: "
                    f"{warned} damaged shards set aside)", "Traceback" in stderr,
                    "recomputed by the teacher; training equal to the fill run" if same else "DIFFERENT",
                    same and warned == 2))
    victim = ws.root / "victim.txt"
    victim.write_text("not the cache's")
    (cache / "index.json").write_text(json.dumps({"../../victim.txt": {"0" * 32: [1, "0" * 32]}}))
    run_dir = ws.run_dir("crafted_index")
    code, stderr = ws.cli(ws.overrides(**{"teacher.cache": str(cache)}), run_dir)
    ok = code == 0 and victim.read_text() == "not the cache's" and not (ws.root / "victim.corrupt").exists()
    rows.append(Row("crafted_cache_index", "index.json naming ../../victim.txt", _seen(stderr),
                    "Traceback" in stderr, "the file outside the cache untouched" if ok else "TOUCHED", ok))
    full = _full_disk_cache(ws)
    if full is not None:
        rows.append(full)
    return rows


def _full_disk_cache(ws: Workspace) -> Row | None:
    """The teacher cache on a 64 KiB tmpfs (a private mount namespace): warned once, the run ends."""
    if shutil.which("unshare") is None:
        return None
    cache, run_dir = ws.root / "small_cache", ws.run_dir("cache_full_disk")
    cache.mkdir()
    args = " ".join(f"'{a}'" for a in ws.overrides(**{"teacher.cache": str(cache)}) + [f"hydra.run.dir={run_dir}"])
    script = f"mount -t tmpfs -o size=64k tmpfs {cache} || exit 77; {sys.executable} -m kdlib {args}"
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ws.root,
                         env=ws.env, capture_output=True, text=True, timeout=900)
    if out.returncode == 77:
        return None
    warnings = (out.stdout + out.stderr).count("No space left on device")  # Hydra logs to stdout
    ok = out.returncode == 0 and warnings == 1 and "Traceback" not in out.stderr
    return Row("cache_full_disk", "teacher cache on a 64 KiB tmpfs", f"(finished; {warnings} warning about the full disk)",
               "Traceback" in out.stderr, "the run, with the live teacher; no temporary file", ok)


def checkpoint_faults(ws: Workspace) -> list[Row]:
    rows = []
    crafted = ws.run_dir("crafted_checkpoint")
    ws.cli(ws.overrides(**{"train.checkpoint_every": "1"}), crafted)
    step = sorted((crafted / "checkpoints").glob("step_*"))[-1]
    import pickle

    marker = ws.root / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (step / ".metadata").write_bytes(pickle.dumps(Payload()))
    rows.append(_one_line_error(ws, "crafted_checkpoint", ".metadata replaced by a pickle that runs code",
                                ws.overrides() + [f"train.resume={step}"], r"checksums|\.metadata|refused|changed"))
    rows[-1].ok = rows[-1].ok and not marker.exists()
    rows[-1].kept = "no code ran" if not marker.exists() else "CODE RAN"
    return rows


KILLABLE = """
import os, sys, time
from pathlib import Path
from kdlib.parallel import checkpoint as ckpt
ready = Path(sys.argv[1])
real_publish = ckpt.publish
def publish(staging, final, **kwargs):
    if Path(final).name == "step_2":  # everything of step_2 written, not yet renamed into place
        ready.write_text("x")
        time.sleep(600)
    return real_publish(staging, final, **kwargs)
ckpt.publish = publish
from kdlib.cli import main
sys.argv = ["kdlib", *sys.argv[2:]]
main()
"""


def sigkill_in_checkpoint(ws: Workspace) -> list[Row]:
    """SIGKILL while step_2's checkpoint is being published: step_1 stays the newest complete one,
    and resuming from the run directory ends as the uninterrupted run (bit for bit)."""
    script = ws.root / "killable.py"
    script.write_text(KILLABLE)
    run_dir, reference, ready = ws.run_dir("sigkill_checkpoint"), ws.run_dir("sigkill_reference"), ws.root / "ready"
    args = ws.overrides() + ["train.checkpoint_every=1", "train.keep_checkpoints=4"]
    process = subprocess.Popen([sys.executable, str(script), str(ready), *args, f"hydra.run.dir={run_dir}"],
                               cwd=ws.root, env=ws.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    complete = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    code, stderr = ws.cli(args + [f"train.resume={run_dir}"], run_dir)
    ws.cli(args, reference)
    same = code == 0 and _same_rows(_rows(run_dir), _rows(reference)) and _same_student(run_dir, reference)
    ok = complete == ["step_1"] and same
    return [Row("sigkill_in_checkpoint", "SIGKILL while step_2 is published", f"(killed; newest complete: {complete})",
                "Traceback" in stderr, "step_1; the resumed run equals the uninterrupted one bit for bit" if same
                else "DIFFERENT", ok)]


def _in_tmpfs(ws: Workspace, mount: Path, size: str, args: list[str], run_dir: Path) -> subprocess.CompletedProcess | None:
    """``kdlib args`` with ``mount`` a private tmpfs of ``size`` (None where none can be made)."""
    if shutil.which("unshare") is None:
        return None
    mount.mkdir(parents=True, exist_ok=True)
    quoted = " ".join(f"'{a}'" for a in args + [f"hydra.run.dir={run_dir}"])
    keep = ws.root / (mount.name + "_kept")
    script = (f"mount -t tmpfs -o size={size} tmpfs {mount} || exit 77; {sys.executable} -m kdlib {quoted}; "
              f"rc=$?; cp -a {mount} {keep}; exit $rc")
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ws.root,
                         env=ws.env, capture_output=True, text=True, timeout=900)
    return None if out.returncode == 77 else out


def full_disk(ws: Workspace) -> list[Row]:
    rows = []
    run_dir = ws.run_dir("full_disk_checkpoint")
    out = _in_tmpfs(ws, run_dir / "checkpoints", "2560k", ws.overrides() + ["train.checkpoint_every=1"], run_dir)
    if out is not None:
        seen = _seen(out.stderr)
        ok = out.returncode == 2 and "No space left on device" in seen and "is intact" in seen and "Traceback" not in out.stderr
        rows.append(Row("full_disk_checkpoint", "checkpoints on a 2.5 MB tmpfs (one fits)", seen, "Traceback" in out.stderr,
                        "the previous checkpoint, intact; no partial directory", ok))
    run_dir = ws.run_dir("full_disk_student")
    out = _in_tmpfs(ws, run_dir, "200k", ws.overrides(**{"train.checkpoint_minutes": "0"}), run_dir)
    if out is not None:
        seen = _seen(out.stderr)
        ok = out.returncode == 2 and seen.startswith("kdlib: error: cannot save the student") and "Traceback" not in out.stderr
        rows.append(Row("full_disk_student", "the run directory on a 200 KiB tmpfs (no room for the student)", seen,
                        "Traceback" in out.stderr, "metrics, eval and log; the weights only if there is room for them", ok))
    return rows


def two_cache_writers(ws: Workspace) -> list[Row]:
    """Two processes fill one teacher cache at once: both finish, every entry reads back."""
    cache = ws.root / "shared_cache"
    args = ws.overrides() + ["+recipe=cache_teacher", f"teacher.cache={cache}"]
    runs = [ws.run_dir(f"cache_writer_{i}") for i in (1, 2)]
    processes = [subprocess.Popen([sys.executable, "-m", "kdlib", *args, f"hydra.run.dir={d}"], cwd=ws.root, env=ws.env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for d in runs]
    outputs = [p.communicate(timeout=900)[1] for p in processes]
    from kdlib.cache.store import TeacherCache

    cache_view = TeacherCache.for_reading(cache)
    read = cache_view.fetch(sorted(cache_view._index))
    ok = all(p.returncode == 0 for p in processes) and not read.unserved and not list(cache.glob("**/*.tmp"))
    return [Row("two_cache_writers", "two `+recipe=cache_teacher` runs on one cache at once", "(both finished)",
                any("Traceback" in o for o in outputs), f"{len(cache_view)} entries, all readable", ok)]


def crafted_carrier(ws: Workspace) -> list[Row]:
    """A carrier message whose metadata names a callable: refused, nothing imported or called."""
    import torch

    from kdlib.teacher_output import TeacherOutput

    try:
        TeacherOutput.from_parts({"hidden": torch.randn(2, 4), "alignment.x": torch.zeros(1)},
                                 {"types": {"alignment": "os:system"}})
        seen, ok = "(accepted)", False
    except Exception as exc:  # noqa: BLE001 - what a worker would report
        seen, ok = f"{type(exc).__name__}: {exc}", "\n" not in str(exc)
    return [Row("crafted_carrier", "a message whose metadata names os:system", seen, False, "nothing imported", ok)]


PROBES: dict[str, Callable[[Workspace], list[Row]]] = {
    "bad_inputs": bad_inputs,
    "bad_steps": bad_steps,
    "sigterm_offpolicy": lambda ws: [sigterm(ws, "sigterm_offpolicy", [])],
    "sigterm_onpolicy": lambda ws: [sigterm(ws, "sigterm_onpolicy", ["+recipe=onpolicy", "rollout.max_new_tokens=8",
                                                                     "algorithm.kd_ratio=1.0"])],
    "sigterm_cache": lambda ws: [sigterm(ws, "sigterm_teacher_cache", [f"teacher.cache={ws.root / 'resume_cache'}"])],
    "cache": cache_faults,
    "two_cache_writers": two_cache_writers,
    "checkpoints": checkpoint_faults,
    "sigkill_in_checkpoint": sigkill_in_checkpoint,
    "full_disk": full_disk,
    "crafted_carrier": crafted_carrier,
}


def table(rows: list[Row]) -> str:
    lines = ["| probe | injected | what the user sees | traceback | what is kept | |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        sees = r.sees.replace("|", "\\|")
        if len(sees) > 220:
            sees = sees[:217] + "..."
        lines.append(f"| {r.probe} | {r.injected} | `{sees}` | {'yes' if r.traceback else 'no'} | {r.kept} | "
                     f"{'ok' if r.ok else 'FAIL'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="replace the table between the fault-suite markers of this file")
    parser.add_argument("--only", default="", help="run the probes whose name contains this")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kdlib-faults-") as tmp:
        ws = Workspace(Path(tmp))
        for name, probe in PROBES.items():
            if args.only in name:
                start = time.perf_counter()
                try:
                    rows.extend(probe(ws))
                except Exception as exc:  # noqa: BLE001 - a probe that breaks is a failed row, not a lost table
                    rows.append(Row(name, "(the probe itself failed)", f"{type(exc).__name__}: {exc}", True, "", False))
                print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    text = table(rows)
    print(text)
    if args.write:
        doc = args.write.read_text(encoding="utf-8")
        stamp = f"\n_`python scripts/fault_suite.py --write {args.write}`, {time.strftime('%Y-%m-%d')}_\n\n"
        block = f"{START}{stamp}{text}\n{END}"
        doc = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S) if START in doc \
            else doc.rstrip() + "\n\n" + block + "\n"
        args.write.write_text(doc, encoding="utf-8")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
