"""The SGLang backend's typed options: one Engine's ServerArgs, the teacher's, the rollout's.

Selected as ``teacher/backend=sglang`` (options at ``teacher.backend.*``) and ``rollout=sglang``
(options at ``rollout.*``). The fields kdlib's protocol depends on are set by kdlib itself (see
:data:`RESERVED_SERVER_ARGS`); ``server_args`` adds any other
ServerArgs field, checked against the installed SGLang when an engine starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from kdlib.config.models import TeacherBackendConfig
from kdlib.config.rollout import RolloutConfig
from kdlib.config.node import ConfigNode
from kdlib.errors import ConfigError

# What an SGLang engine can release and take back (sglang.srt.constants GPU_MEMORY_TYPE_*).
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
# ServerArgs fields kdlib sets itself (its protocol depends on them); `server_args` may not.
RESERVED_SERVER_ARGS = frozenset({
    "mem_fraction_static", "quantization", "attention_backend", "context_length", "model_path", "dtype", "trust_remote_code", "revision", "tp_size", "device", "base_gpu_id",
    "random_seed", "log_level", "skip_tokenizer_init", "enable_return_hidden_states",
    "disable_radix_cache", "chunked_prefill_size", "enable_memory_saver",
    "enable_weights_cpu_backup", "enable_deterministic_inference",
})
# The weight-sync strategy of weight_sync=distributed (registered by this package).
BROADCAST_SYNC = "sglang_broadcast"


class WeightSync(str, Enum):
    """How the student's weights reach SGLang rollout engines after every optimizer step."""

    # Buckets through kdlib's transport, loaded with Engine.update_weights_from_tensor: engines
    # that share the students' GPUs (colocated), or any placement the transport reaches.
    tensor = "tensor"
    # Broadcast from student rank 0 into the engines over NCCL (gloo on CPU):
    # init_weights_update_group + update_weights_from_distributed; engines on their own GPUs.
    distributed = "distributed"


@dataclass
class SGLangEngineConfig(ConfigNode):
    """Options of one SGLang ``Engine`` (teacher or rollout), passed to it as ServerArgs fields."""

    # GPUs per engine (tensor parallelism); on Ray the worker holding it asks for this many GPUs.
    tp_size: int = 1
    # Fraction of each GPU's memory SGLang reserves for weights and KV cache (null: SGLang's own
    # choice); set it lower when the engine shares its GPUs with student workers.
    mem_fraction_static: Optional[float] = None
    # Quantization applied at load, e.g. fp8 (an FP8 teacher, as in KDFlow); null: the checkpoint's.
    quantization: Optional[str] = None
    # Attention kernels: fa3, flashinfer, triton, ... (null: SGLang picks by GPU).
    attention_backend: Optional[str] = None
    # Longest sequence the engine accepts (null: the model's own limit).
    context_length: Optional[int] = None
    # Log level of the engine's processes.
    log_level: str = "error"
    # Further ServerArgs fields, passed as given (checked against the installed SGLang at start).
    server_args: dict[str, Any] = field(default_factory=dict)

    def check_engine(self) -> None:
        """The engine fields' rules (called by the teacher's and the rollout's check)."""
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if self.context_length is not None and self.context_length < 1:
            raise ValueError(f"context_length must be positive, got {self.context_length}")
        clashes = sorted(set(self.server_args) & RESERVED_SERVER_ARGS)
        if clashes:
            raise ValueError(f"server_args: {clashes} are set by kdlib; use the typed options instead")


def _ask_for_tp_gpus(cfg: Any, role: str, key: str, tp_size: int, device_type: str, record: Any) -> None:
    """On GPUs, a worker holding a tensor-parallel engine asks Ray for tp_size GPUs."""
    placement = getattr(cfg.launcher, role, None)
    if device_type == "cuda" and tp_size > 1 and placement is not None and placement.gpus_per_worker is None:
        placement.gpus_per_worker = float(tp_size)
        record(f"launcher.{role}.gpus_per_worker", f"{tp_size}", f"{key}.tp_size")


def _check_tp_gpus(cfg: Any, role: str, key: str, tp_size: int) -> None:
    gpus = getattr(getattr(cfg.launcher, role, None), "gpus_per_worker", None)
    if tp_size > 1 and gpus is not None and gpus < tp_size:
        raise ConfigError(f"launcher.{role}.gpus_per_worker={gpus:g} is fewer than {key}.tp_size={tp_size} "
                          "(only a tp_size=1 engine can share its GPU)")


@dataclass
class SGLangTeacherOptions(TeacherBackendConfig, SGLangEngineConfig):
    """teacher/backend=sglang: one SGLang Engine per teacher worker, prefill only, hidden states out."""

    name: str = "sglang"
    # What the engine releases while the students train: any of kv_cache, weights, cuda_graph;
    # null: all three with pipeline.colocate, none otherwise (resolved before the run).
    offload_tags: Optional[list[str]] = None
    # Keep a host copy of the weights while they are released; without it SGLang resumes with
    # lost weights (the teacher is never re-synced), so offloading weights requires it.
    weights_cpu_backup: bool = True

    def check(self) -> None:
        self.check_engine()
        tags = self.offload_tags or []
        unknown = sorted(set(tags) - set(MEMORY_TAGS))
        if unknown:
            raise ValueError(f"offload_tags: unknown {unknown}; choose among {list(MEMORY_TAGS)}")
        if "weights" in tags and not self.weights_cpu_backup:
            raise ValueError(
                "offload_tags has weights but weights_cpu_backup=false: SGLang would resume the "
                "teacher with lost weights; keep the backup or drop weights from offload_tags"
            )

    def resolve(self, cfg: Any, device_type: str, record: Any) -> None:
        _ask_for_tp_gpus(cfg, "teacher", "teacher.backend", self.tp_size, device_type, record)
        if self.offload_tags is None:
            colocate = cfg.pipeline.colocate
            self.offload_tags = list(MEMORY_TAGS) if colocate else []
            record("teacher.backend.offload_tags", str(self.offload_tags),
                   f"follows pipeline.colocate={str(colocate).lower()}")

    def check_run(self, cfg: Any) -> None:
        _check_tp_gpus(cfg, "teacher", "teacher.backend", self.tp_size)


@dataclass
class SGLangRolloutConfig(RolloutConfig, SGLangEngineConfig):
    """rollout=sglang: the rollout options, sampled by SGLang engines."""

    backend: str = "sglang"
    # How the student's weights reach the engines after every step: tensor or distributed.
    weight_sync: WeightSync = WeightSync.tensor
    # Release the engine's GPU memory (weights, KV cache, CUDA graphs) after every generation and
    # take it back at the next weight sync: for engines sharing their GPUs with the students.
    release_memory: bool = False
    # SGLang's deterministic inference, each sample seeded from kdlib's seed (slower).
    deterministic: bool = False

    def check(self) -> None:
        RolloutConfig.check(self)
        self.check_engine()

    def weight_sync_strategy(self) -> str:
        from kdlib.config.rollout import TRANSPORT_SYNC

        return BROADCAST_SYNC if self.weight_sync is WeightSync.distributed else TRANSPORT_SYNC

    def resolve(self, cfg: Any, device_type: str, record: Any) -> None:
        _ask_for_tp_gpus(cfg, "rollout", "rollout", self.tp_size, device_type, record)

    def check_run(self, cfg: Any) -> None:
        _check_tp_gpus(cfg, "rollout", "rollout", self.tp_size)
        if self.weight_sync is WeightSync.distributed and cfg.launcher.name != "ray":
            raise ConfigError(
                "rollout.weight_sync=distributed needs launcher=ray: student rank 0 and the engines "
                "must take part in the broadcast at the same time"
            )
