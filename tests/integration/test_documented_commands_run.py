"""Every documented command that can run on this CPU runs, shortened to two steps on a few samples
(slow: each loads the embedded teacher). Commands that need a hub model, a GPU, files of the
user's own (``chats.jsonl``), a running Ray cluster, SGLang or a teacher server are composed only
(tests/unit/test_documented_commands.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from documented_commands import documented_commands, documented_modules, jobs
from kdlib.config.compose import compose, import_plugins, plugins_in
from kdlib.locations import resolve_location

pytestmark = pytest.mark.slow

SHORT = ["train.max_steps=2", "data.max_samples=16", "data.eval_max_samples=8", "rollout.max_new_tokens=16",
         "logging.progress=false"]


def runnable(argv) -> bool:
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return False  # --cfg job and friends print, they do not run
    for overrides in jobs(list(argv)):
        import_plugins(plugins_in(overrides))
        cfg = compose(overrides)
        teachers = [cfg.teacher, *cfg.teachers.values()]  # named teachers too (issue 27)
        local = [t.model for t in teachers] + [cfg.student.model, cfg.data.train] + ([cfg.data.eval] if cfg.data.eval else [])
        if not all(Path(resolve_location(spec)).exists() for spec in local):
            return False
        if (any(t.backend.name != "hf" for t in teachers) or cfg.rollout.backend != "hf" or cfg.device.startswith("cuda")
                or getattr(cfg.launcher, "address", None) not in (None, "local")):
            return False
    return True


# the plugin modules the docs write out, importable while the commands are collected and run
MODULES = Path(tempfile.mkdtemp(prefix="kdlib-documented-"))
for _name, _source in documented_modules().items():
    (MODULES / f"{_name}.py").write_text(_source)
sys.path.insert(0, str(MODULES))


def runnable_commands() -> list:
    return list({c.argv: c for c in reversed(documented_commands()) if runnable(c.argv)}.values())[::-1]  # once each


def _selected(config) -> bool:
    """Whether ``-m`` keeps this module's tests (marked slow, nothing else). Finding the runnable
    commands composes every documented one (half a minute): not done when they are deselected."""
    markexpr = config.getoption("markexpr", None)
    if not markexpr:
        return True
    try:
        from _pytest.mark import MarkMatcher
        from _pytest.mark.expression import Expression

        return Expression.compile(markexpr).evaluate(MarkMatcher.from_markers([pytest.mark.slow.mark]))
    except Exception:  # noqa: BLE001 - pytest internals moved: collect them all, as before
        return True


def pytest_generate_tests(metafunc):
    if "command" in metafunc.fixturenames:
        commands = runnable_commands() if _selected(metafunc.config) else []
        metafunc.parametrize("command", commands, ids=[c.id for c in commands])


@pytest.fixture(scope="module")
def workdir():
    return MODULES


def test_documented_command_runs(command, workdir):
    sweep = "-m" in command.argv or "--multirun" in command.argv or "+recipe=prune_search" in command.argv
    where = workdir / command.id.replace("/", "_").replace(":", "_")
    place = [f"hydra.sweep.dir={where}"] if sweep else [f"hydra.run.dir={where}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled",
               WANDB_MODE="offline", PYTHONPATH=str(workdir))
    out = subprocess.run([sys.executable, "-m", "kdlib", *command.argv, *SHORT, *place], cwd=workdir,
                         capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, f"`{command.text}` ({command.id}) failed:\n{out.stderr[-3000:]}"
