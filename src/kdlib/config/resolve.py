"""Resolve, then freeze: every ``auto`` value and derived value settled once, with its reason.

A run's config is resolved in one place before anything is built: the precision of each model and
the student's autocast (by what the device computes natively), the transport (follows the
launcher), AdamW's implementation (fused where torch has the kernel), each backend's own ``auto``
options (the hf rollout engine by the torch versions it was tested with; a tensor-parallel
engine's GPUs), the mode's defaults (``mode=sft`` trains with the sft algorithm), and, once the
checkpoints' own configs can be read (``models=True``, in ``kdlib.run``), packing (text or
image+text, per-sample attention or not), and the data files' layout (``data.format``, detected
from their columns when the files are checked). Each choice is recorded in ``cfg.auto_choices`` as
``"<value>: <reason>"``; the run log prints them once. :func:`kdlib.runner.run` then freezes the
config (:func:`kdlib.config.node.freeze`) and writes it to ``config.yaml``: that file is exactly
what the workers receive, and any later write raises.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from kdlib.config.data import DataFormat
from kdlib.config.models import Precision
from kdlib.config.node import AUTO
from kdlib.config.schema import KDConfig, Mode
from kdlib.config.teachers import resolve_teachers
from kdlib.config.training import AdamWImpl

# Attention implementations that attend within each sample of a packed row, computing nothing
# across samples (kdlib's packed_sdpa, FlashAttention's varlen kernels).
PER_SAMPLE_ATTENTION = frozenset({"packed_sdpa", "flash_attention_2", "flash_attention_3"})


class Choices:
    """``record(key, value, reason)``: notes a resolved value in ``cfg.auto_choices``."""

    def __init__(self, cfg: KDConfig) -> None:
        self.cfg = cfg

    def __call__(self, key: str, value: Any, reason: str) -> None:
        self.cfg.auto_choices[key] = f"{value}: {reason}"


def device_type(cfg: KDConfig) -> str:
    """'cuda' or 'cpu' (or 'mps') for the run's device setting (a bad one reads as cpu here; the
    checks name it)."""
    from kdlib.hardware import resolve_device_type

    return resolve_device_type(cfg.device) if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device) else "cpu"


def resolve(cfg: KDConfig, *, models: bool = False, layouts: Optional[dict[str, DataFormat]] = None,
            sweep_job: bool = False) -> KDConfig:
    """Settle ``cfg``'s ``auto`` values in place (values already settled stay); returns ``cfg``.
    ``models``: also what needs the checkpoints' configs (read from disk, no weights);
    ``layouts``: the data files' detected layouts (``kdlib.data.preflight.check_data_files``);
    ``sweep_job``: the run is a job of a ``-m`` sweep (what it saves by default)."""
    record = Choices(cfg)
    device = device_type(cfg)
    _precision(cfg, device, record)
    if cfg.transport.name == AUTO:
        cfg.transport.name = "ray" if cfg.launcher.name == "ray" else "inprocess"
        record("transport", cfg.transport.name, f"follows launcher={cfg.launcher.name}")
    if cfg.train.adamw_impl is AdamWImpl.auto:
        from kdlib.optim import fused_adamw_available

        fused = fused_adamw_available(device, cfg.student.dtype)
        cfg.train.adamw_impl = AdamWImpl.fused if fused else AdamWImpl.default
        record("train.adamw_impl", cfg.train.adamw_impl.value,
               f"torch {'has' if fused else 'has no'} fused AdamW for {cfg.student.dtype.value} on {device}")
    from kdlib.controller import MODES

    mode = MODES.get(cfg.mode.value)
    mode.resolve(cfg, record)
    _said_only_where_used(cfg, mode)
    cfg.teacher.backend.resolve(cfg, device, record)
    cfg.rollout.resolve(cfg, device, record)
    if models:  # what kdlib.run settles: the models' configs, and whether this run is a sweep's job
        _packing(cfg, record)
        _saving(cfg, record, sweep_job)
        needs = mode.needs(cfg)
        _student_layers(cfg, record, builds_student=needs.students or cfg.teacher.from_student)
    if layouts:
        _data_format(cfg, layouts, record)
    return cfg


def _data_format(cfg: KDConfig, layouts: dict[str, DataFormat], record: Choices) -> None:
    """``data.format=auto``: the layout detected in the data files' columns, when they agree."""
    if cfg.data.format is not DataFormat.auto:
        return
    found = set(layouts.values())
    described = ", ".join(f"{key} is {fmt.value}" for key, fmt in layouts.items())
    if len(found) == 1:
        cfg.data.format = found.pop()
        record("data.format", cfg.data.format.value, f"detected in the columns of {', '.join(layouts)}")
    else:  # each file is read in its own layout: the one setting that stays a rule
        record("data.format", "auto", f"{described}: each file is read in the layout of its columns")


def _precision(cfg: KDConfig, device: str, record: Choices) -> None:
    from kdlib.hardware import bf16_support

    for role in ("teacher", "student"):
        model = getattr(cfg, role)
        if model.dtype is Precision.auto:
            support = bf16_support(device)
            model.dtype = Precision.bfloat16 if support.native else Precision.float32
            record(f"{role}.dtype", model.dtype.value, support.reason)
    resolve_teachers(cfg, record, lambda: bf16_support(device))
    if isinstance(cfg.student.autocast, str) and cfg.student.autocast.lower() == AUTO:
        support = bf16_support(device)
        cfg.student.autocast = support.native and cfg.student.dtype is Precision.float32
        record("student.autocast", str(cfg.student.autocast).lower(), support.reason)


def _said_only_where_used(cfg: KDConfig, mode: Any) -> None:
    """Every part's ``auto`` values are settled (the config stays whole) but the log says only those
    of parts this run uses: no teacher precision in SFT, no rollout engine off-policy; with the
    teacher cache, the teacher's precision is what it computes in if the cache misses samples."""
    from kdlib.controller.mode import TeacherNeed

    needs = mode.needs(cfg)
    unused = ([] if needs.teacher is not TeacherNeed.none else ["teacher."]) + (["rollout."] if needs.rollout is None else [])
    for key in [k for k in cfg.auto_choices if k.startswith(tuple(unused))] if unused else []:
        del cfg.auto_choices[key]
    said, note = cfg.auto_choices.get("teacher.dtype"), " (if the teacher computes: teacher.cache may cover every sample)"
    if said is not None and cfg.teacher.cache and not said.endswith(note):
        cfg.auto_choices["teacher.dtype"] = said + note


def _saving(cfg: KDConfig, record: Choices, sweep_job: bool) -> None:
    if cfg.save_student == AUTO:
        cfg.save_student = not sweep_job
        record("save_student", str(cfg.save_student).lower(),
               "a sweep job: the sweep's table compares the jobs (save_student=true keeps each student)"
               if sweep_job else "a single run keeps its student")
    if cfg.save_dtype is Precision.auto:
        bf16 = cfg.student.dtype is Precision.bfloat16 or cfg.student.autocast is True
        cfg.save_dtype = Precision.bfloat16 if bf16 else Precision.float32
        record("save_dtype", cfg.save_dtype.value, "the student computed in bf16 (autocast or dtype)" if bf16
               else "the student computed in float32")


def _student_layers(cfg: KDConfig, record: Choices, *, builds_student: bool) -> None:
    """The student's pruning, checked against its checkpoint's config before any weight loads:
    ``student.num_layers`` becomes the evenly spaced ``keep_layers`` it means; ``student.prune``
    gets the cache directory of its pruned checkpoint (made once, then reused). A run that builds
    no student (generation, filling a teacher cache) prunes nothing and reads no student config."""
    from kdlib.errors import ConfigError

    student = cfg.student
    if not builds_student:
        return
    if student.num_layers is None and student.keep_layers is None and not student.prune.active:
        return
    from kdlib.models.pruning import evenly_spaced_layers
    from kdlib.models.vlm import decoder_layer_count

    n = decoder_layer_count(student)
    if student.keep_layers is None and student.num_layers is not None:
        if not 1 <= student.num_layers <= n:
            raise ConfigError(f"student.num_layers={student.num_layers}, but student.model={student.model} has {n} "
                              f"decoder layers: choose 1 to {n}, or student.num_layers=null to train it whole")
        student.keep_layers = evenly_spaced_layers(n, student.num_layers)
        record("student.keep_layers", student.keep_layers, f"{student.num_layers} of {n} layers, evenly spaced")
    elif student.keep_layers is not None:
        keep = list(student.keep_layers)
        if not keep or len(set(keep)) != len(keep) or not all(0 <= i < n for i in keep):
            raise ConfigError(f"student.keep_layers must be distinct indices of the {n} decoder layers of "
                              f"{student.model} (0 to {n - 1}), got {keep}")
    if student.prune.active:
        if student.prune.num_layers is not None and student.prune.num_layers > n:
            raise ConfigError(f"student.prune.num_layers={student.prune.num_layers}, but student.model="
                              f"{student.model} has {n} decoder layers")
        from kdlib.models.pruned import pruned_directory

        student.prune.output = str(pruned_directory(cfg))
        record("student.prune.output", student.prune.output,
               f"{student.model} pruned by {student.prune.depth.value} (made once, then reused)")


def _packing(cfg: KDConfig, record: Choices) -> None:
    """``train.packing=auto``: pack text runs (no compute on padding); pad image+text runs. An
    on-policy run with an attention that computes a packed row's full square (``sdpa``, ``eager``)
    is padded too: its rollouts mostly run to ``rollout.max_new_tokens``, so there is little
    padding to remove and the cross-sample attention costs more than it saves (benchmarks/step.py,
    docs/benchmarks.md)."""
    if cfg.train.packing != AUTO:
        return
    from kdlib.controller.modality import is_vision_language

    vision = is_vision_language(cfg.student)
    per_sample = {cfg.student.attn_implementation, cfg.teacher.attn_implementation} <= PER_SAMPLE_ATTENTION
    cfg.train.packing = not vision and (per_sample or cfg.mode is not Mode.onpolicy)
    if vision:
        reason = "vision-language models lay images out per row"
    elif not cfg.train.packing:
        reason = "on-policy rollouts leave little padding and this attention computes across packed samples"
    else:
        reason = "text models: no compute on padding"
    record("train.packing", str(cfg.train.packing).lower(), reason)
