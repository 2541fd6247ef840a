"""The typed configuration of a kdlib run: the one source of truth for keys, types and defaults.

Every option a user can set is a field of a dataclass (in this package's modules: models, data,
training, rollout, reporting), with a comment saying what it does. Hydra composes YAML files from
``conf/`` (which only choose and fill values: model paths, sizes, recipe overrides) on top of these
dataclasses, so a wrong key or type fails at composition, before any model loads. Groups whose
options are implementations (loss, algorithm, launcher, transport, rollout, teacher/backend, reward) get
their options from the registries: each registered name contributes its own config subclass, so
``loss=jsd loss.beta=0.3`` is typed without any YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING

from kdlib.config.data import BadImages, DataConfig, DataFormat, Overlong, Unalignable
from kdlib.config.models import (
    FreezeConfig, FSDPConfig, LoraConfig, ModelConfig, Precision, StudentConfig, TeacherBackendConfig, TeacherConfig,
)
from kdlib.config.node import BoolOrAuto, ConfigNode, check_bool_or_auto
from kdlib.config.reporting import LoggingConfig, WandbConfig, WandbMode
from kdlib.config.rollout import RolloutConfig
from kdlib.config.signal import SignalConfig, SignalKind
from kdlib.config.teachers import RoutingConfig
from kdlib.config.training import (
    AdamWImpl, AlgorithmConfig, EvalConfig, GenerateConfig, HiddenDtype, LauncherConfig, LossConfig,
    LossImplementation, OnPolicyConfig, PipelineConfig, TrainConfig, TransportConfig,
)


class Mode(str, Enum):
    """Which controller loop runs."""

    offpolicy = "offpolicy"  # distil on a fixed dataset (teacher scores the dataset's responses)
    onpolicy = "onpolicy"  # the student samples responses, the teacher scores them, the student learns
    sft = "sft"  # supervised fine-tuning on the dataset's responses, no teacher (algorithm sft)
    generate = "generate"  # write teacher responses for the dataset's prompts (sequence-level KD data)
    cache = "cache"  # only fill teacher.cache with the teacher's outputs for data.train and data.eval


@dataclass
class KDConfig(ConfigNode):
    """A whole run. `kdlib.compose()` returns one; `kdlib.run()` takes one."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # More teachers, by name (the run's own is `teacher`); routing says which scores each sample.
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    student: StudentConfig = field(default_factory=StudentConfig)
    # Registry-backed groups: their node types come from the selected option.
    algorithm: Any = MISSING
    loss: Any = MISSING
    transport: Any = MISSING
    launcher: Any = MISSING
    rollout: Any = MISSING
    # On-policy task reward (registry `reward`; none: no reward, KD alone).
    reward: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    # Which controller loop runs.
    mode: Mode = Mode.offpolicy
    # Seed of weights init, data order and sampling.
    seed: int = 42
    # cpu, cuda, cuda:N, or auto (cuda when available).
    device: str = "auto"
    # Python modules imported before the config is composed (user losses, algorithms, backends).
    plugins: list[str] = field(default_factory=list)
    # Run directory; null: Hydra's run dir under the CLI, outputs/<date>/<time> from Python.
    output_dir: Optional[str] = None
    # Save the final student (Hugging Face format) into <run dir>/student: true, false, or auto
    # (true for a single run, false for the jobs of a -m sweep, whose table compares them; rerun
    # the chosen one, or set save_student=true to keep every job's student).
    save_student: BoolOrAuto = "auto"
    # Precision of the saved student's weights: float32, bfloat16, or auto (bfloat16 when the student
    # computed in bf16, as with student.autocast on a CPU with native bf16: half the bytes).
    save_dtype: Precision = Precision.auto
    # Filled when the config is resolved, not set by users: what each `auto` value became, and why.
    auto_choices: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        check_bool_or_auto(self.save_student, "save_student")


__all__ = [
    "AdamWImpl", "AlgorithmConfig", "BadImages", "ConfigNode", "DataConfig", "DataFormat", "EvalConfig",
    "FSDPConfig", "FreezeConfig", "GenerateConfig", "HiddenDtype", "KDConfig", "LauncherConfig", "LoggingConfig",
    "LoraConfig", "LossConfig", "LossImplementation", "Mode", "ModelConfig", "OnPolicyConfig", "Overlong",
    "PipelineConfig", "Precision", "RolloutConfig", "SignalConfig", "SignalKind", "StudentConfig", "TeacherBackendConfig", "TeacherConfig",
    "TrainConfig", "TransportConfig", "Unalignable", "WandbConfig", "WandbMode",
]
