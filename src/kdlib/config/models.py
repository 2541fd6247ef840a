"""The models of a run: what every model shares, the teacher (and its backend's options), the student.

A teacher backend contributes its own options class (a :class:`TeacherBackendConfig` subclass,
registered with the backend in ``kdlib.backends``); Hydra selects it as the config group
``teacher/backend`` (``teacher/backend=<name> teacher.backend.<option>=...``), so the shared
schema names no backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING

from kdlib.config.node import BoolOrAuto, ConfigNode, check_bool_or_auto
from kdlib.config.signal import SignalConfig
from kdlib.pruning.config import PruneConfig


class Precision(str, Enum):
    """Floating-point type of model weights and computation."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    # bfloat16 where the device computes it natively (CUDA with bf16, CPUs with AVX-512-BF16 or
    # AMX), float32 elsewhere; resolved before the run (see auto_choices).
    auto = "auto"


@dataclass
class ModelConfig(ConfigNode):
    """Fields shared by every model the run loads."""

    # Hugging Face hub id, local directory, a .gguf file, or pkg://<package>/<file> inside an
    # installed Python package (how the embedded SmolLM2 teacher is found).
    model: str = MISSING
    # Tokenizer location when it differs from `model`.
    tokenizer: Optional[str] = None
    # Hub revision (branch, tag or commit) for hub ids.
    revision: Optional[str] = None
    # Weight and compute precision.
    dtype: Precision = Precision.float32
    # transformers attention implementation: packed_sdpa (kdlib's: sdpa, and packed rows attend per
    # sample without computing across samples), sdpa, eager, flash_attention_2, ...
    attn_implementation: str = "packed_sdpa"
    # Allow custom modelling code from the hub (off by default, as in transformers).
    trust_remote_code: bool = False
    # A Jinja chat template (inline text or a file path) replacing the tokenizer's own.
    chat_template: Optional[str] = None


@dataclass
class FSDPConfig(ConfigNode):
    """How the student is sharded when it has more than one worker."""

    # Shard group size for HSDP (replicate across groups, shard within); -1 = shard over all workers.
    shard_size: int = -1
    # Dtype of the gathered parameters in forward/backward (null: the weights' own dtype).
    param_dtype: Optional[Precision] = None
    # Dtype of gradient reduction.
    reduce_dtype: Precision = Precision.float32
    # Keep parameters, gradients and optimizer state on the CPU between uses.
    cpu_offload: bool = False
    # Free each layer's gathered parameters after its forward (re-gather in backward).
    reshard_after_forward: bool = True


@dataclass
class TeacherBackendConfig(ConfigNode):
    """Base of a teacher backend's options (group ``teacher/backend``); `name` is the backend."""

    # Teacher inference backend (registry `teacher backend`): hf, or another registered one.
    name: str = MISSING

    def resolve(self, cfg: Any, device_type: str, record: Any) -> None:
        """Settle this backend's ``auto`` options from the whole config (``record(key, value,
        reason)`` notes each choice). Nothing by default."""

    def check_run(self, cfg: Any) -> None:
        """Rules across the whole config (raise ConfigError). Nothing by default."""


@dataclass
class TeacherConfig(ModelConfig):
    """The model that only runs forward passes and sends hidden states."""

    # Inference backend and its options: the config group teacher/backend (hf by default).
    backend: Any = field(default_factory=lambda: TeacherBackendConfig(name="hf"))
    # What the teacher sends per loss position: hidden states (exact, the default), its top-k
    # log-probabilities, or tokens sampled from it (see docs/teacher_signals.md).
    signal: SignalConfig = field(default_factory=SignalConfig)
    # Number of teacher workers (more than one needs launcher=ray).
    num_workers: int = 1
    # Self-distillation: the teacher is built like the student (its model and pruning, in this
    # config's dtype), starting from the student's initial weights; `model` is then ignored.
    from_student: bool = False
    # With from_student: copy the student's weights into the teacher every this many optimizer
    # steps (0 = never: a frozen copy of the initial student).
    update_freq: int = 0
    # With from_student: after every step, teacher = ema_decay * teacher + (1 - ema_decay) * student
    # (null = off; excludes update_freq).
    ema_decay: Optional[float] = None
    # Directory of an offline teacher cache: teacher outputs for data.train / data.eval samples
    # are read from it when present and written to it when missing; a run it covers fully loads
    # no teacher model (only its head). Refused when it was filled by another teacher, tokenizer
    # or dtype. null = off.
    cache: Optional[str] = None

    @property
    def follows_student(self) -> bool:
        """A self-distillation teacher updated from the student as training goes."""
        return self.ema_decay is not None or self.update_freq > 0

    def check(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be positive, got {self.num_workers}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.update_freq < 0:
            raise ValueError(f"update_freq must be >= 0, got {self.update_freq}")
        if self.ema_decay is not None and self.update_freq:
            raise ValueError("ema_decay and teacher.update_freq exclude each other: choose averaging or refreshing")
        if self.follows_student and not self.from_student:
            raise ValueError("update_freq / teacher.ema_decay need teacher.from_student=true (self-distillation)")
        if self.cache and self.from_student:
            raise ValueError("cache keeps a fixed teacher's outputs; a self-distillation teacher "
                             "(teacher.from_student) changes with the student")


@dataclass
class LoraConfig(ConfigNode):
    """LoRA adapters on the student, through peft: only the adapters train (off while r = 0)."""

    # Rank of each adapter's update B @ A; 0 = no LoRA (every student weight trains).
    r: int = 0
    # The update is scaled by alpha / r.
    alpha: float = 16.0
    # Dropout on the adapters' input during training.
    dropout: float = 0.0
    # Linear layers that get adapters, by the last part of their name (q_proj, down_proj, ...);
    # null = every linear layer of the decoder blocks (attention and MLP projections).
    target_modules: Optional[list[str]] = None
    # Modules trained in full beside the adapters (e.g. [lm_head]); saved with the adapter.
    modules_to_save: Optional[list[str]] = None


@dataclass
class FreezeConfig(ConfigNode):
    """Student weights kept fixed while the rest trains (full fine-tuning of the rest)."""

    # Keep the input embeddings fixed (and a head tied to them).
    embeddings: bool = False
    # Keep the first this many decoder layers (of the pruned student) fixed.
    first_layers: int = 0


@dataclass
class StudentConfig(ModelConfig):
    """The model that trains."""

    # Depth-prune the loaded model to this many decoder layers, evenly spaced, first and last kept
    # (resolved into keep_layers before the run).
    num_layers: Optional[int] = None
    # Depth-prune to exactly these decoder layer indices (overrides num_layers).
    keep_layers: Optional[list[int]] = None
    # Prune by measured importance (depth and width, to sizes or a parameter budget), once per
    # source and data, before training: see docs/pruning.md. Excludes num_layers / keep_layers.
    prune: PruneConfig = field(default_factory=PruneConfig)
    # Number of data-parallel student workers (more than one needs launcher=ray).
    num_workers: int = 1
    # Recompute activations in the backward pass to save memory.
    gradient_checkpointing: bool = False
    # Vision-language students: keep the vision tower and its projector frozen (only the language
    # model and head train); false trains them too. Text-only students have nothing to freeze.
    freeze_vision: bool = True
    # Run the student's matrix products in bfloat16 under torch.autocast; weights, optimizer
    # state and the KD/CE loss stay in `dtype` (mixed precision). true, false, or auto (true
    # where bf16 is native on the device, see Precision.auto; resolved before the run).
    autocast: BoolOrAuto = False
    # Sharding of the student across its workers (used when num_workers > 1).
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    # LoRA adapters through peft (student.lora.r > 0 turns them on).
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Frozen embeddings or first decoder layers (off by default).
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    # Student transforms (registry `student transform`) in the order they run, after loading and
    # pruning, before sharding; each does nothing unless its options (student.<name>) turn it on.
    # A plugin's own transform is added by name here.
    transforms: list[str] = field(default_factory=lambda: ["freeze", "lora"])

    def check(self) -> None:
        check_bool_or_auto(self.autocast, "autocast")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be positive, got {self.num_workers}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be positive or null, got {self.num_layers}")
        if self.prune.active and (self.num_layers is not None or self.keep_layers is not None):
            raise ValueError("num_layers / student.keep_layers (evenly spaced or given layers, pruned at load) and "
                             "student.prune (pruning by importance) exclude each other: choose one")

