"""Checks of a composed config beyond its types: pure functions that read and never write.

Everything a component would reject later is rejected here, before any model or data loads, as one
:class:`~kdlib.errors.ConfigError` line naming the key. Each config class states its own value
rules in its ``check()`` (kdlib's classes and every registered option class: algorithm, loss,
rollout, teacher backend, launcher, transport); :func:`validate` walks the tree and calls them,
naming the key of the node. What spans several parts of the config is below: registry names,
worker and launcher combinations, what the chosen teacher backend can do (its declared
capabilities), each backend's own rules across the run, the student transforms and trackers, the
loss (evaluated once, value and gradient, on a tiny random input, so a bad parameter of any
divergence, built-in or user-registered, is caught by the code that would reject it), the resume
source and the mode's own rules.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

from kdlib.config.node import AUTO, FROZEN_ATTRIBUTE, nodes
from kdlib.config.schema import KDConfig, Precision
from kdlib.config.reward_checks import check_reward_config
from kdlib.config.signal_checks import check_signal
from kdlib.config.store import registry_groups
from kdlib.config.teachers import check_run as check_teachers
from kdlib.errors import ConfigError, first_line

DEVICES = r"auto|cpu|cuda(:\d+)?|mps"


def validate(cfg: KDConfig) -> None:
    """Checks beyond types; raises ConfigError naming the key."""
    check_names(cfg)
    for path, node in nodes(cfg):
        if path != "loss":  # the loss is checked by running it (below)
            _call_check(node, path)
    if not re.fullmatch(DEVICES, cfg.device):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    _check_placement(cfg)
    _check_teacher(cfg)
    check_teachers(cfg)
    _check_attention(cfg)
    _check_backends(cfg)
    _check_student_transforms(cfg)
    _check_trackers(cfg)
    _check_loss(cfg)
    check_signal(cfg)
    _check_resume(cfg)
    _check_mode(cfg)
    check_reward_config(cfg)


def check_unknown_keys(cfg: KDConfig) -> None:
    """Keys that no config class has: ``+trian.lr=1`` adds one (``+`` may add keys), and nothing
    would ever read it, so a typo with ``+`` is as much an error as one without."""
    for path, node in nodes(cfg):
        extra = sorted(set(vars(node)) - {f.name for f in fields(node)} - {FROZEN_ATTRIBUTE})
        if extra:
            where = f"{path}." if path else ""
            known = ", ".join(f.name for f in fields(node))
            raise ConfigError(f"unknown key '{where}{extra[0]}' (added with +); valid keys "
                              f"{'of ' + path + ' ' if path else ''}are: {known}")


def check_names(cfg: KDConfig) -> None:
    """Every registry-backed group names a registered option and holds that option's config."""
    for group, (registry, key) in registry_groups().items():
        path = group.replace("/", ".")
        node = _get(cfg, path)
        choices = ", ".join(registry.names())
        if not hasattr(node, key):  # e.g. teacher.backend=<name> for teacher/backend=<name>
            raise ConfigError(f"{path} is the config group {group}: choose it with {group}=<name> "
                              f"(one of: {choices}), then set its options as {path}.<option>=...")
        name = getattr(node, key)
        if name == AUTO:
            continue  # resolved before the run (transport=auto follows the launcher)
        if name not in registry:
            raise ConfigError(f"{path}.{key}: unknown {registry.kind} {name!r}; choose one of: {choices}")
        expected = registry.entry(name).config_cls
        if expected is not None and not isinstance(node, expected):
            raise ConfigError(f"{path}.{key}={name} does not switch the group's options: choose it with {group}={name}")


def _call_check(node: Any, key: str) -> None:
    try:
        node.check()
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        message = first_line(exc)
        names = {f.name for f in fields(node)}
        head = re.match(r"[A-Za-z_][A-Za-z0-9_]*", message)
        joined = f"{key}.{message}" if head and head.group(0) in names else f"{key}: {message}"
        raise ConfigError(joined) from None


def _check_placement(cfg: KDConfig) -> None:
    if cfg.train.global_batch_size < cfg.student.num_workers:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is smaller than "
            f"student.num_workers={cfg.student.num_workers}: some workers would get no sample"
        )
    if cfg.student.fsdp.cpu_offload and cfg.device == "cpu":
        raise ConfigError("student.fsdp.cpu_offload needs a CUDA device (on the CPU the parameters already live in host memory)")
    if cfg.launcher.name == "ray" and cfg.transport.name == "inprocess":
        raise ConfigError("transport=inprocess cannot carry teacher outputs between Ray actors; use transport=ray (or leave transport unset)")
    if cfg.transport.name == "ray" and cfg.launcher.name != "ray":
        raise ConfigError("transport=ray needs launcher=ray (or use +recipe=ray)")
    if cfg.launcher.name == "local":
        if cfg.rollout.num_workers != 1:
            raise ConfigError(f"rollout.num_workers={cfg.rollout.num_workers} needs launcher=ray")
        for role in ("teacher", "student"):
            if getattr(cfg, role).num_workers != 1:
                raise ConfigError(f"{role}.num_workers={getattr(cfg, role).num_workers} needs launcher=ray (launcher=local runs one worker per role)")


def _check_teacher(cfg: KDConfig) -> None:
    from kdlib.algorithms import ALGORITHMS
    from kdlib.backends import TEACHER_BACKENDS, TeacherCapabilities

    teacher = cfg.teacher
    if teacher.follows_student and cfg.pipeline.prefetch:
        raise ConfigError("a teacher updated from the student needs pipeline.prefetch=0")
    if teacher.follows_student and ALGORITHMS.get(cfg.algorithm.name).needs_alignment:
        raise ConfigError(
            f"algorithm={cfg.algorithm.name} builds its loss on a fixed teacher head; a self-distillation "
            "teacher updated from the student (teacher.update_freq / teacher.ema_decay) needs algorithm=vanilla"
        )
    name = teacher.backend.name
    caps: TeacherCapabilities = TEACHER_BACKENDS.entry(name).info or TeacherCapabilities()
    if cfg.pipeline.colocate and not caps.sleep_wake:
        raise ConfigError(f"pipeline.colocate needs a teacher backend that can sleep and wake; teacher/backend={name} cannot")
    if teacher.from_student and not caps.load_weights:
        raise ConfigError(f"teacher.from_student needs a teacher backend that loads weights; teacher/backend={name} cannot")


def _check_attention(cfg: KDConfig) -> None:
    """FlashAttention-2 (packing becomes variable-length attention) needs CUDA and bf16 compute.
    (Whether flash-attn is installed is for the workers' machines to say: transformers names it.)"""
    from kdlib.backends import TEACHER_BACKENDS
    from kdlib.hardware import resolve_device_type

    teacher_caps = TEACHER_BACKENDS.entry(cfg.teacher.backend.name).info
    roles = ["student"] + (["teacher"] if teacher_caps is not None and teacher_caps.transformers else [])
    for role in roles:
        model = getattr(cfg, role)
        if model.attn_implementation != "flash_attention_2":
            continue
        key = f"{role}.attn_implementation=flash_attention_2"
        if resolve_device_type(cfg.device) != "cuda":
            raise ConfigError(f"{key} needs device=cuda")
        bf16 = model.dtype is Precision.bfloat16 or (role == "student" and cfg.student.autocast is True)
        if not bf16:
            raise ConfigError(f"{key} computes in bf16 only: set {role}.dtype=bfloat16"
                              + (" or student.autocast=true" if role == "student" else ""))


def _check_backends(cfg: KDConfig) -> None:
    """Each chosen backend's rules across the whole config (its options' own check ran above)."""
    cfg.teacher.backend.check_run(cfg)
    cfg.rollout.check_run(cfg)


def _check_student_transforms(cfg: KDConfig) -> None:
    from kdlib.models.transforms import check_transforms

    check_transforms(cfg.student)


def _check_trackers(cfg: KDConfig) -> None:
    from kdlib.tracking.trackers import check_trackers

    check_trackers(cfg)


def _check_loss(cfg: KDConfig) -> None:
    """Evaluate the configured loss (naive and fused paths, value and gradient) on a tiny random
    input: whatever the divergence rejects is rejected now, by the code that would reject it."""
    import torch

    from kdlib.losses import fused_kd_loss, loss_params, per_token_divergence

    _call_check(cfg.loss, "loss")
    loss = cfg.loss
    params = loss_params(loss)
    generator = torch.Generator().manual_seed(0)
    hidden_s = torch.randn(3, 4, generator=generator, requires_grad=True)
    head_s = torch.randn(6, 4, generator=generator)
    hidden_t = torch.randn(3, 5, generator=generator)
    head_t = torch.randn(6, 5, generator=generator)
    try:
        with torch.no_grad():
            per_token_divergence(loss.name, hidden_s @ head_s.T, hidden_t @ head_t.T, temperature=loss.temperature,
                                 scale_by_temperature_squared=loss.scale_by_temperature_squared, **params)
        fused_kd_loss(hidden_s, head_s, hidden_t, head_t, loss=loss.name, chunk_size=2, temperature=loss.temperature,
                      scale_by_temperature_squared=loss.scale_by_temperature_squared, **params).backward()
    except (ValueError, TypeError, RuntimeError, AssertionError) as exc:
        raise ConfigError(f"loss={loss.name}: {first_line(exc)}") from None


def _check_resume(cfg: KDConfig) -> None:
    """``train.resume`` names a complete checkpoint, or a run directory that has one."""
    if not cfg.train.resume:
        return
    from pathlib import Path

    from kdlib.parallel.checkpoint import is_complete, latest_checkpoint

    path = Path(cfg.train.resume)
    if not path.exists():
        raise ConfigError(f"train.resume: {path} does not exist")
    if not is_complete(path) and latest_checkpoint(path) is None:
        raise ConfigError(f"train.resume: no complete checkpoint in {path} (a checkpoint directory, or a run directory with checkpoints/step_<n>)")


def _check_mode(cfg: KDConfig) -> None:
    from kdlib.controller import MODES

    MODES.get(cfg.mode.value).check(cfg)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
