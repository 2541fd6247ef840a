"""Checks of a composed config beyond its types, and the resolution of ``auto`` values.

Everything a component would reject later is rejected here, before any model or data loads, as one
:class:`~kdlib.errors.ConfigError` line naming the key: registry names; sizes and ranges; worker
and launcher combinations; what the chosen teacher backend can do (its declared capabilities);
each registry-backed group's own ``check()`` (algorithm, rollout, launcher, transport options);
the student transforms (LoRA, freezing) and the experiment trackers (known, installed);
the loss, by evaluating it once, value and gradient, on a tiny random input (so a bad parameter
of any divergence, built-in or user-registered, is caught by the code that would reject it); and
the mode's own checks.

``resolve_auto`` settles ``auto`` values first (dtype, autocast, transport) and writes what each
became, and why, into ``cfg.auto_choices``, which the resolved config in the run directory shows.
"""

from __future__ import annotations

import re
from typing import Any

from kdlib.config.schema import ADAMW_IMPLS, SGLANG_MEMORY_TAGS, KDConfig, Precision, SGLangRolloutConfig, WeightSync
from kdlib.config.store import registry_groups
from kdlib.errors import ConfigError, first_line

AUTO = "auto"
_TRUE_FALSE_AUTO = (True, False, AUTO)


def resolve_auto(cfg: KDConfig) -> None:
    """Replace ``auto`` values by what this machine runs best; record each choice."""
    from kdlib.hardware import bf16_support, resolve_device_type

    device = resolve_device_type(cfg.device) if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device) else "cpu"
    for role in ("teacher", "student"):
        model = getattr(cfg, role)
        if model.dtype is Precision.auto:
            support = bf16_support(device)
            model.dtype = Precision.bfloat16 if support.native else Precision.float32
            cfg.auto_choices[f"{role}.dtype"] = f"{model.dtype.value}: {support.reason}"
    if isinstance(cfg.student.autocast, str) and cfg.student.autocast.lower() == AUTO:
        support = bf16_support(device)
        cfg.student.autocast = support.native and cfg.student.dtype is Precision.float32
        cfg.auto_choices["student.autocast"] = f"{str(cfg.student.autocast).lower()}: {support.reason}"
    if cfg.transport.name == AUTO:
        cfg.transport.name = "ray" if cfg.launcher.name == "ray" else "inprocess"
        cfg.auto_choices["transport"] = f"{cfg.transport.name}: follows launcher={cfg.launcher.name}"
    for role, tp_size in _sglang_engines(cfg).items():
        placement = getattr(cfg.launcher, role, None)
        if device == "cuda" and tp_size > 1 and placement is not None and placement.gpus_per_worker is None:
            placement.gpus_per_worker = float(tp_size)
            cfg.auto_choices[f"launcher.{role}.gpus_per_worker"] = f"{tp_size}: {role}.sglang.tp_size"
    if cfg.teacher.backend == "sglang" and cfg.teacher.sglang.offload_tags is None:
        colocate = cfg.pipeline.colocate
        cfg.teacher.sglang.offload_tags = list(SGLANG_MEMORY_TAGS) if colocate else []
        cfg.auto_choices["teacher.sglang.offload_tags"] = (
            f"{cfg.teacher.sglang.offload_tags}: follows pipeline.colocate={str(colocate).lower()}"
        )


def validate(cfg: KDConfig) -> None:
    """Checks beyond types; raises ConfigError naming the key."""
    _check_names(cfg)
    _positive(cfg, [
        "train.epochs", "train.global_batch_size", "train.micro_batch_size", "train.lr",
        "loss.temperature", "loss.chunk_size", "data.max_len", "eval.batch_size", "logging.log_every",
        "rollout.max_new_tokens", "rollout.batch_size", "rollout.n_samples_per_prompt",
        "teacher.num_workers", "student.num_workers", "rollout.num_workers", "onpolicy.sync_bucket_mb",
        "train.max_bad_steps",
    ])
    _check_ranges(cfg)
    _check_placement(cfg)
    _check_teacher(cfg)
    _check_sglang(cfg)
    _check_attention(cfg)
    _check_student_transforms(cfg)
    _check_trackers(cfg)
    _check_group_options(cfg)
    _check_loss(cfg)
    _check_resume(cfg)
    _check_mode(cfg)


def _check_names(cfg: KDConfig) -> None:
    from kdlib.teacher import TEACHER_BACKENDS

    for group, (registry, key) in registry_groups().items():
        name = getattr(getattr(cfg, group), key)
        if name not in registry:
            raise ConfigError(f"{group}.{key}: unknown {registry.kind} {name!r}; choose one of: {', '.join(registry.names())}")
    if cfg.teacher.backend not in TEACHER_BACKENDS:
        raise ConfigError(
            f"teacher.backend: unknown teacher backend {cfg.teacher.backend!r}; "
            f"choose one of: {', '.join(TEACHER_BACKENDS.names())}"
        )
    if cfg.student.autocast not in _TRUE_FALSE_AUTO:
        raise ConfigError(f"student.autocast: expected true, false or auto, got {cfg.student.autocast!r}")
    if cfg.train.packing not in _TRUE_FALSE_AUTO:
        raise ConfigError(f"train.packing: expected true, false or auto, got {cfg.train.packing!r}")
    if cfg.train.adamw_impl not in ADAMW_IMPLS:
        raise ConfigError(f"train.adamw_impl: expected one of {', '.join(ADAMW_IMPLS)}, got {cfg.train.adamw_impl!r}")


def _check_ranges(cfg: KDConfig) -> None:
    if cfg.train.max_steps == 0 or cfg.train.max_steps < -1:
        raise ConfigError(f"train.max_steps must be positive or -1 (train.epochs decides), got {cfg.train.max_steps}")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {cfg.train.min_lr_ratio}")
    if not 0.0 <= cfg.train.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {cfg.train.warmup_ratio}")
    if cfg.train.max_grad_norm < 0:
        raise ConfigError(f"train.max_grad_norm must be >= 0 (0 = no clipping), got {cfg.train.max_grad_norm}")
    if cfg.train.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints must be >= 1, got {cfg.train.keep_checkpoints}")
    if cfg.train.checkpoint_every < 0 or cfg.eval.every_steps < 0:
        raise ConfigError("train.checkpoint_every and eval.every_steps must be >= 0 (0 = never)")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}")
    if cfg.rollout.temperature < 0:
        raise ConfigError(f"rollout.temperature must be >= 0 (0 = greedy), got {cfg.rollout.temperature}")
    if cfg.train.max_tokens_per_micro_batch is not None and cfg.train.max_tokens_per_micro_batch < 1:
        raise ConfigError(f"train.max_tokens_per_micro_batch must be positive or null, got {cfg.train.max_tokens_per_micro_batch}")
    if cfg.pipeline.prefetch < 0:
        raise ConfigError(f"pipeline.prefetch must be >= 0, got {cfg.pipeline.prefetch}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")


def _check_placement(cfg: KDConfig) -> None:
    if cfg.train.global_batch_size < cfg.student.num_workers:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is smaller than "
            f"student.num_workers={cfg.student.num_workers}: some workers would get no sample"
        )
    if cfg.pipeline.colocate and cfg.pipeline.prefetch:
        raise ConfigError("pipeline.colocate=true needs pipeline.prefetch=0: colocated teacher and students take turns on the devices")
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
    from kdlib.teacher import TEACHER_BACKENDS, TeacherCapabilities

    teacher = cfg.teacher
    if teacher.ema_decay is not None and not 0.0 <= teacher.ema_decay < 1.0:
        raise ConfigError(f"teacher.ema_decay must be in [0, 1), got {teacher.ema_decay}")
    if teacher.ema_decay is not None and teacher.update_freq:
        raise ConfigError("teacher.ema_decay and teacher.update_freq exclude each other: choose averaging or refreshing")
    if (teacher.ema_decay is not None or teacher.update_freq) and not teacher.from_student:
        raise ConfigError("teacher.update_freq / teacher.ema_decay need teacher.from_student=true (self-distillation)")
    if teacher.update_freq < 0:
        raise ConfigError(f"teacher.update_freq must be >= 0, got {teacher.update_freq}")
    if (teacher.ema_decay is not None or teacher.update_freq) and cfg.pipeline.prefetch:
        raise ConfigError("a teacher updated from the student needs pipeline.prefetch=0")
    if teacher.cache and teacher.from_student:
        raise ConfigError("teacher.cache keeps a fixed teacher's outputs; a self-distillation teacher (teacher.from_student) changes with the student")
    from kdlib.algorithms import ALGORITHMS

    if (teacher.ema_decay is not None or teacher.update_freq) and ALGORITHMS.get(cfg.algorithm.name).needs_alignment:
        raise ConfigError(
            f"algorithm={cfg.algorithm.name} builds its loss on a fixed teacher head; a self-distillation "
            "teacher updated from the student (teacher.update_freq / teacher.ema_decay) needs algorithm=vanilla"
        )
    entry = TEACHER_BACKENDS.entry(teacher.backend)
    caps: TeacherCapabilities = entry.info or TeacherCapabilities()
    if cfg.pipeline.colocate and not caps.sleep_wake:
        raise ConfigError(f"pipeline.colocate needs a teacher backend that can sleep and wake; teacher.backend={teacher.backend} cannot")
    if teacher.from_student and not caps.load_weights:
        raise ConfigError(f"teacher.from_student needs a teacher backend that loads weights; teacher.backend={teacher.backend} cannot")
    if entry.config_cls is not None:
        options = getattr(teacher, teacher.backend, None)
        if not isinstance(options, entry.config_cls):
            raise ConfigError(f"teacher.{teacher.backend}: expected {entry.config_cls.__name__} options")
        _call_check(options, f"teacher.{teacher.backend}")


def _check_attention(cfg: KDConfig) -> None:
    """FlashAttention-2 (packing becomes variable-length attention) needs CUDA and bf16 compute.
    (Whether flash-attn is installed is for the workers' machines to say: transformers names it.)"""
    from kdlib.hardware import resolve_device_type

    roles = ["student"] + (["teacher"] if cfg.teacher.backend == "hf" else [])
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


def _sglang_engines(cfg: KDConfig) -> dict[str, int]:
    """Role -> tp_size of the roles that run SGLang engines."""
    engines = {}
    if cfg.teacher.backend == "sglang":
        engines["teacher"] = cfg.teacher.sglang.tp_size
    if isinstance(cfg.rollout, SGLangRolloutConfig):
        engines["rollout"] = cfg.rollout.sglang.tp_size
    return engines


def _check_sglang(cfg: KDConfig) -> None:
    """The SGLang backends' options (the teacher's own check ran with the teacher's)."""
    from kdlib.sglang_engine import RESERVED_SERVER_ARGS

    engines = []
    if cfg.teacher.backend == "sglang":
        engines.append(("teacher.sglang", cfg.teacher.sglang))
    if isinstance(cfg.rollout, SGLangRolloutConfig):
        _call_check(cfg.rollout.sglang, "rollout.sglang")
        engines.append(("rollout.sglang", cfg.rollout.sglang))
        if cfg.rollout.sglang.weight_sync is WeightSync.distributed and cfg.launcher.name != "ray":
            raise ConfigError(
                "rollout.sglang.weight_sync=distributed needs launcher=ray: student rank 0 and the engines "
                "must take part in the broadcast at the same time"
            )
    for key, options in engines:
        clashes = sorted(set(options.server_args) & RESERVED_SERVER_ARGS)
        if clashes:
            raise ConfigError(f"{key}.server_args: {clashes} are set by kdlib; use the typed options instead")
    for role, tp_size in _sglang_engines(cfg).items():
        gpus = getattr(getattr(cfg.launcher, role, None), "gpus_per_worker", None)
        if tp_size > 1 and gpus is not None and gpus < tp_size:
            raise ConfigError(
                f"launcher.{role}.gpus_per_worker={gpus:g} is fewer than {role}.sglang.tp_size={tp_size} "
                "(only a tp_size=1 engine can share its GPU)"
            )


def _check_student_transforms(cfg: KDConfig) -> None:
    from kdlib.models.transforms import check_transforms

    check_transforms(cfg.student)


def _check_trackers(cfg: KDConfig) -> None:
    from kdlib.tracking.trackers import check_trackers

    check_trackers(cfg)


def _check_group_options(cfg: KDConfig) -> None:
    for group in registry_groups():
        if group != "loss":  # the loss is checked by running it
            _call_check(getattr(cfg, group), group)


def _call_check(node: Any, key: str) -> None:
    check = getattr(node, "check", None)
    if callable(check):
        try:
            check()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{key}: {exc}") from None


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


def _positive(cfg: KDConfig, keys: list[str]) -> None:
    for key in keys:
        value = _get(cfg, key)
        if value is None or value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
