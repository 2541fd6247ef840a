"""The ``kdlib`` command: Hydra's command line over ``kdlib.run``.

Before Hydra takes over, the overrides are checked by composing them (every combination of a
``-m`` sweep), so a wrong key, type or name stops the command with one line naming it, before any
model loads. ``plugins=[module]`` modules are imported first, so user-registered losses and
algorithms are valid choices. Hydra then does what it does best: ``--cfg job``, ``-m`` sweeps with a
directory per job, ``+recipe=...``, ``hydra.run.dir=...``.

What the user sees of a failure: a :class:`~kdlib.errors.KdlibError` (bad input, a fault kdlib
handles) is one line, ``kdlib: error: ...``, exit code 2; a plugin that raises while it is imported
is one such line naming its file and line. Any other exception is a bug in kdlib: its traceback,
then one line asking for a bug report, exit code 1.
"""

from __future__ import annotations

import itertools
import signal
import sys
import traceback
from typing import Optional, Sequence

from kdlib.errors import ConfigError, Interrupted, KdlibError

# Hydra flags that take a value, and flags that only ask for information.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc",
               "--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun"}
_MAX_CHECKED_JOBS = 64


def main(argv: Optional[Sequence[str]] = None) -> None:
    import hydra

    from kdlib.config.compose import conf_dir, import_plugins, plugins_in
    from kdlib.config.store import register_configs

    args = list(sys.argv[1:] if argv is None else argv)
    flags, overrides = split_arguments(args)
    try:
        import_plugins(plugins_in(overrides))
        if not flags & _INFO_FLAGS:
            # a recipe may sweep by itself (hydra.mode: MULTIRUN, e.g. +recipe=prune_search), so a
            # sweep override is read as one even without -m (Hydra refuses it in a single run)
            preflight(overrides, multirun=bool(flags & {"-m", "--multirun"}) or _sweeps(overrides))
    except KdlibError as exc:
        _fail(exc)
    except Exception:  # noqa: BLE001 - a bug: shown whole, with where to report it
        _bug()
    register_configs()
    if not flags & _INFO_FLAGS:
        args.append(_fixed_overrides_excluded(overrides))  # a sweep's job directories named by its swept values
    sys.argv = [sys.argv[0] if sys.argv else "kdlib", *args]
    hydra.main(config_path=conf_dir(), config_name="config", version_base=None)(_task)()
    if _FAILED_JOBS:
        _fail(KdlibError(f"{len(_FAILED_JOBS)} sweep job(s) failed ({', '.join(_FAILED_JOBS)}); the sweep's "
                         "sweep_results.md says why"))


# Sweep jobs that failed with a kdlib error in this process (the sweep goes on without them).
_FAILED_JOBS: list[str] = []


def _sweeps(overrides: list[str]) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides))
    except Exception:  # noqa: BLE001 - preflight reports a bad override in one line
        return False


def _fixed_overrides_excluded(overrides: list[str]) -> str:
    """The Hydra override that leaves the overrides a sweep does not vary out of its job names."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(
        [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))])
    fixed = sorted({o.key_or_group for o in parsed if not o.is_sweep_override()})
    return "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(f"'{k}'" for k in fixed) + "]"


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from kdlib.runner import run
    from kdlib.tracking.trackers import identity_from_hydra

    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    _one_console_for_hub_logs()
    try:
        run(cfg, run_dir=hydra_cfg.runtime.output_dir, identity=identity_from_hydra(hydra_cfg))
    except Interrupted as exc:
        if exc.resume_dir is not None:
            exc.command = resume_command(list(hydra_cfg.overrides.task), exc.resume_dir)
        _fail(exc)
    except KdlibError as exc:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            _fail(exc)
        from pathlib import Path

        from kdlib.tracking.sweep import record_failure

        record_failure(Path(hydra_cfg.runtime.output_dir), str(exc))
        _FAILED_JOBS.append(Path(hydra_cfg.runtime.output_dir).name)
        print(f"kdlib: error: sweep job {Path(hydra_cfg.runtime.output_dir).name}: {exc} (the sweep goes on)",
              file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps, or a second one inside them
        _fail(Interrupted("interrupted by SIGINT; no checkpoint written", signal_number=signal.SIGINT, resume_dir=None))
    except Exception:  # noqa: BLE001 - a bug: shown whole, with where to report it
        _bug()


def _one_console_for_hub_logs() -> None:
    """huggingface_hub prints its records on a console handler of its own and passes them on to
    Hydra's: each line twice. Hydra's handlers (console and kdlib.log) are kept."""
    import logging

    hub = logging.getLogger("huggingface_hub")
    for handler in [h for h in hub.handlers if type(h) is logging.StreamHandler]:
        hub.removeHandler(handler)


def resume_command(task_overrides: list[str], resume_dir: str) -> str:
    """The command line that continues a job from ``resume_dir`` (its run directory) in the same
    directory: its own overrides (a sweep's job, not the sweep) with ``train.resume`` set."""
    import shlex

    kept = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") not in ("train.resume", "hydra.run.dir")]
    return shlex.join(["kdlib", *kept, f"train.resume={resume_dir}", f"hydra.run.dir={resume_dir}"])


def split_arguments(args: Sequence[str]) -> tuple[set[str], list[str]]:
    """(Hydra flags, overrides) of a command line."""
    flags: set[str] = set()
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            flags.add(name)
            if name in _VALUE_FLAGS and "=" not in arg and i + 1 < len(args):
                i += 1
            elif name in {"--info", "-i"} and i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1]:
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def preflight(overrides: list[str], *, multirun: bool) -> None:
    """Compose every job the command would run; raise ConfigError on the first bad one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdlib.config.compose import compose
    from kdlib.data.preflight import check_data_files
    from kdlib.rewards.columns import check_reward_columns

    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        parsed = OverridesParser.create().parse_overrides(job_overrides)
    except Exception as exc:
        raise ConfigError(f"cannot parse overrides: {str(exc).strip().splitlines()[0]}") from None
    choices = []
    for override in parsed:
        if multirun and override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    checked_data: set[tuple] = set()
    for n, combination in enumerate(itertools.product(*choices)):
        if n >= _MAX_CHECKED_JOBS:
            break
        try:
            cfg = compose(list(combination))
            # each distinct data set (and the reward columns read from it) once, not once per job
            data_key = (cfg.data.train, cfg.data.eval, cfg.data.format, cfg.data.teacher_input_key,
                        cfg.reward.name, getattr(cfg.reward, "column", None), cfg.reward.eval_prompts)
            if data_key not in checked_data:
                check_data_files(cfg.data)
                check_reward_columns(cfg)
                checked_data.add(data_key)
        except KdlibError as exc:
            if multirun and any(len(c) > 1 for c in choices):
                raise type(exc)(f"{exc} (in sweep job {' '.join(combination)})") from None
            raise


def _fail(exc: Exception) -> None:
    print(f"kdlib: error: {exc}", file=sys.stderr)
    sys.exit(getattr(exc, "exit_code", 2))


BUG_REPORT = ("kdlib: internal error: this is a bug in kdlib, not a problem with your input; please report it at "
              "the project's issue tracker with this traceback")


def _bug() -> None:
    """An unexpected exception (not a KdlibError): its traceback, then where to report it."""
    traceback.print_exc()
    print(BUG_REPORT, file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
