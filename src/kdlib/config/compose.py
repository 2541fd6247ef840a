"""Composing a typed config: Hydra composition, plugin imports, validation, one-line errors.

``compose(overrides)`` is the notebook/test entry point (the CLI goes through ``@hydra.main`` but
validates the same way): it imports the ``plugins=[...]`` modules named in the overrides (so user
losses and algorithms are registered), composes ``conf/config.yaml`` with the overrides, converts
the result to :class:`~kdlib.config.KDConfig` dataclasses and checks values that types alone cannot
(registry names, positive sizes, launcher/worker combinations). Every failure is a
:class:`~kdlib.errors.ConfigError` with one line that names the key and, where there is a closed
set, the valid choices.
"""

from __future__ import annotations

import importlib
import importlib.resources
import re
import sys
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from kdlib.config.schema import KDConfig, Mode
from kdlib.config.store import register_configs, registry_groups
from kdlib.errors import ConfigError

CONFIG_NAME = "config"


def conf_dir() -> str:
    """Absolute path of the shipped ``conf/`` (the package ``kdlib.conf``)."""
    return str(importlib.resources.files("kdlib.conf"))


def compose(overrides: Sequence[str] = ()) -> KDConfig:
    """The typed config of ``kdlib <overrides>`` (no run directory, no Hydra job)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = list(overrides)
    import_plugins(plugins_in(overrides))
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        try:
            cfg = hydra_compose(CONFIG_NAME, overrides=overrides)
        except Exception as exc:  # Hydra/OmegaConf composition errors
            raise ConfigError(explain(exc, overrides)) from None
    return to_typed(cfg)


def to_typed(cfg: DictConfig | KDConfig) -> KDConfig:
    """KDConfig dataclasses from a composed DictConfig, validated."""
    if isinstance(cfg, KDConfig):
        typed = cfg
    else:
        cfg = cfg.copy()
        if "hydra" in cfg:
            with open_dict(cfg):
                cfg.pop("hydra")
        try:
            typed = OmegaConf.to_object(cfg)
        except Exception as exc:
            raise ConfigError(explain(exc, [])) from None
        if not isinstance(typed, KDConfig):
            raise ConfigError("the composed config is not a kdlib config (was kdlib_schema dropped from defaults?)")
    validate(typed)
    return typed


def validate(cfg: KDConfig) -> None:
    """Checks beyond types; raises ConfigError naming the key."""
    from kdlib.rollout import ROLLOUT_BACKENDS
    from kdlib.teacher import TEACHER_BACKENDS

    names = {group: getattr(getattr(cfg, group), key) for group, (_, key) in registry_groups().items()}
    for group, (registry, key) in registry_groups().items():
        if names[group] not in registry:
            raise ConfigError(f"{group}.{key}: unknown {registry.kind} {names[group]!r}; choose one of: {', '.join(registry.names())}")
    if cfg.teacher.backend not in TEACHER_BACKENDS:
        raise ConfigError(
            f"teacher.backend: unknown teacher backend {cfg.teacher.backend!r}; "
            f"choose one of: {', '.join(TEACHER_BACKENDS.names())}"
        )
    if cfg.rollout.backend not in ROLLOUT_BACKENDS:
        raise ConfigError(f"rollout.backend: unknown rollout backend {cfg.rollout.backend!r}; choose one of: {', '.join(ROLLOUT_BACKENDS.names())}")
    _positive(cfg, [
        "train.epochs", "train.global_batch_size", "train.micro_batch_size", "train.lr",
        "loss.temperature", "loss.chunk_size", "data.max_len", "eval.batch_size", "logging.log_every",
        "rollout.max_new_tokens", "rollout.batch_size", "rollout.n_samples_per_prompt",
        "teacher.num_workers", "student.num_workers", "rollout.num_workers", "onpolicy.sync_bucket_mb",
    ])
    if cfg.train.max_steps == 0 or cfg.train.max_steps < -1:
        raise ConfigError(f"train.max_steps must be positive or -1 (all epochs), got {cfg.train.max_steps}")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {cfg.train.min_lr_ratio}")
    if not 0.0 <= cfg.train.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {cfg.train.warmup_ratio}")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}")
    if cfg.rollout.temperature < 0:
        raise ConfigError(f"rollout.temperature must be >= 0 (0 = greedy), got {cfg.rollout.temperature}")
    if cfg.train.global_batch_size < cfg.student.num_workers:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is smaller than "
            f"student.num_workers={cfg.student.num_workers}: some workers would get no sample"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.pipeline.prefetch < 0:
        raise ConfigError(f"pipeline.prefetch must be >= 0, got {cfg.pipeline.prefetch}")
    if cfg.pipeline.colocate and cfg.pipeline.prefetch:
        raise ConfigError("pipeline.colocate=true needs pipeline.prefetch=0: colocated teacher and students take turns on the devices")
    if cfg.train.max_tokens_per_micro_batch is not None and cfg.train.max_tokens_per_micro_batch < 1:
        raise ConfigError(f"train.max_tokens_per_micro_batch must be positive or null, got {cfg.train.max_tokens_per_micro_batch}")
    if cfg.student.fsdp.cpu_offload and cfg.device == "cpu":
        raise ConfigError("student.fsdp.cpu_offload needs a CUDA device (on the CPU the parameters already live in host memory)")
    if cfg.launcher.name == "ray" and cfg.transport.name == "inprocess":
        raise ConfigError("transport=inprocess cannot carry teacher outputs between Ray actors; add transport=ray (or use +recipe=ray)")
    if cfg.transport.name == "ray" and cfg.launcher.name != "ray":
        raise ConfigError("transport=ray needs launcher=ray (or use +recipe=ray)")
    if cfg.teacher.ema_decay is not None and not 0.0 <= cfg.teacher.ema_decay < 1.0:
        raise ConfigError(f"teacher.ema_decay must be in [0, 1), got {cfg.teacher.ema_decay}")
    if cfg.teacher.ema_decay is not None and cfg.teacher.update_freq:
        raise ConfigError("teacher.ema_decay and teacher.update_freq exclude each other: choose averaging or refreshing")
    if (cfg.teacher.ema_decay is not None or cfg.teacher.update_freq) and not cfg.teacher.from_student:
        raise ConfigError("teacher.update_freq / teacher.ema_decay need teacher.from_student=true (self-distillation)")
    if cfg.teacher.update_freq < 0:
        raise ConfigError(f"teacher.update_freq must be >= 0, got {cfg.teacher.update_freq}")
    if cfg.mode is Mode.onpolicy:
        if not 0.0 <= cfg.onpolicy.lmbda <= 1.0:
            raise ConfigError(f"onpolicy.lmbda must be in [0, 1], got {cfg.onpolicy.lmbda}")
        if cfg.pipeline.prefetch:
            raise ConfigError("mode=onpolicy needs pipeline.prefetch=0: each rollout needs the student's latest weights")
        if cfg.train.global_batch_size % cfg.rollout.n_samples_per_prompt:
            raise ConfigError(
                f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
                f"rollout.n_samples_per_prompt={cfg.rollout.n_samples_per_prompt} in mode=onpolicy"
            )
    if (cfg.teacher.ema_decay is not None or cfg.teacher.update_freq) and cfg.pipeline.prefetch:
        raise ConfigError("a teacher updated from the student needs pipeline.prefetch=0")
    if cfg.launcher.name == "local":
        if cfg.rollout.num_workers != 1:
            raise ConfigError(f"rollout.num_workers={cfg.rollout.num_workers} needs launcher=ray")
        for role in ("teacher", "student"):
            if getattr(cfg, role).num_workers != 1:
                raise ConfigError(f"{role}.num_workers={getattr(cfg, role).num_workers} needs launcher=ray (launcher=local runs one worker per role)")
    if cfg.mode is not Mode.generate and cfg.student.model in (None, "???"):
        raise ConfigError("student.model is not set")
    for group in ("algorithm", "loss"):
        check = getattr(getattr(cfg, group), "check", None)
        if callable(check):
            try:
                check()
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{group}: {exc}") from None


def plugins_in(overrides: Iterable[str]) -> list[str]:
    """Module names given by a ``plugins=...`` / ``+plugins=...`` override."""
    modules: list[str] = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.lstrip("+~") != "plugins":
            continue
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            value = value[1:-1]
        modules.extend(v.strip().strip("'\"") for v in value.split(",") if v.strip())
    return modules


def import_plugins(modules: Iterable[str]) -> None:
    """Import user modules (they register losses, algorithms, backends); '.' is importable."""
    modules = list(modules)
    if modules and "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # only when asked: a stray file here must not shadow a package
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"plugins: cannot import {name!r}: {exc}") from None


def explain(exc: BaseException, overrides: Sequence[str]) -> str:
    """One line from a Hydra or OmegaConf error, with the valid choices when there is a set."""
    text = str(exc)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split(f"Available options in '{group}':", 1)[-1], re.M)
        choices = f"; choose one of: {', '.join(options)}" if options else ""
        return f"unknown {group} {option!r}{choices}"
    multiple = re.search(r"Multiple values for (\S+?)\.", text)
    if multiple:
        group = multiple.group(1)
        return f"{group} is given twice; combine options of one group as +{group}=[a,b]"
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        return f"unknown key {key!r}" + _valid_keys_hint(key, overrides)
    cause = exc.__cause__ or exc.__context__
    merge = re.search(r"Error merging override (\S+?)=(.*)", text)
    if merge and cause is not None:
        return f"bad value for {merge.group(1)}: {_first_line(cause)}"
    key = re.search(r"full_key: (\S+)", text)
    if key:
        return f"{key.group(1)}: {_first_line(exc)}"
    return _first_line(exc) + (f" ({_first_line(cause)})" if cause is not None and _first_line(cause) not in text else "")


def _valid_keys_hint(key: str, overrides: Sequence[str]) -> str:
    """'; valid keys of <parent>: ...' computed from the config without the bad override."""
    from hydra import compose as hydra_compose

    rest = [o for o in overrides if not o.lstrip("+~").startswith(key + "=")]
    try:
        cfg = hydra_compose(CONFIG_NAME, overrides=rest)
    except Exception:
        return ""
    parent = key.rpartition(".")[0]
    while parent and not isinstance(OmegaConf.select(cfg, parent), DictConfig):
        parent = parent.rpartition(".")[0]  # walk up to the deepest part that exists
    node: Any = OmegaConf.select(cfg, parent) if parent else cfg
    keys = [k for k in node.keys() if k != "hydra"]
    where = f"of {parent} " if parent else ""
    return f"; valid keys {where}are: {', '.join(map(str, keys))}"


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


def _positive(cfg: KDConfig, keys: list[str]) -> None:
    for key in keys:
        value = _get(cfg, key)
        if value is None or value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg

