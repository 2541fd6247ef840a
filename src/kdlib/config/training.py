"""How a run trains: objective (algorithm, loss), optimisation, evaluation, and how work moves.

The algorithm, loss, transport and launcher groups are registries: each registered name brings its
own config subclass of the bases here (``loss=jsd loss.beta=0.3`` is typed without a YAML file).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from omegaconf import MISSING

from kdlib.config.node import BoolOrAuto, ConfigNode, check_bool_or_auto


class LossImplementation(str, Enum):
    """How the KD loss is computed from hidden states."""

    fused = "fused"  # chunked over tokens, never materialises [tokens, vocab] logits
    naive = "naive"  # full logits of the micro-batch, then the divergence (reference path)


class HiddenDtype(str, Enum):
    """Type of the teacher hidden states on the wire (never float16: it overflows)."""

    bfloat16 = "bfloat16"
    float32 = "float32"


class AdamWImpl(str, Enum):
    """Which implementation of torch's AdamW updates the weights (all compute the same update)."""

    # fused where torch has the kernel for the student's device and dtype, else torch's default
    auto = "auto"
    fused = "fused"  # one kernel per parameter group (several times faster on a CPU)
    foreach = "foreach"
    for_loop = "for_loop"
    default = "default"  # whatever torch.optim.AdamW picks when told nothing


@dataclass
class AlgorithmConfig(ConfigNode):
    """Base of every algorithm's config; `name` selects the registry entry (subclasses add their
    options and may override check())."""

    name: str = MISSING


@dataclass
class LossConfig(ConfigNode):
    """Base of every divergence's config; subclasses add the divergence's own parameters (and may
    override check() to validate them)."""

    # Divergence (registry `loss`): kl, rkl, jsd, tvd, ...
    name: str = MISSING
    # Softmax temperature applied to teacher and student logits.
    temperature: float = 1.0
    # Multiply the loss by temperature**2 (Hinton et al.), keeping gradient scale when T != 1.
    scale_by_temperature_squared: bool = False
    # fused (chunked, low memory) or naive (full logits; the reference for tests).
    implementation: LossImplementation = LossImplementation.fused
    # Tokens per chunk in the fused loss; memory is about chunk_size x vocab floats.
    chunk_size: int = 256


@dataclass
class TrainConfig(ConfigNode):
    """Optimisation."""

    # Passes over the training data.
    epochs: int = 1
    # Stop after this many optimizer steps (-1: run all epochs).
    max_steps: int = -1
    # Samples per optimizer step (across all student workers).
    global_batch_size: int = 8
    # Samples per forward/backward pass on one worker; gradients accumulate up to the global batch.
    micro_batch_size: int = 4
    # Peak learning rate of AdamW.
    lr: float = 5e-5
    # Final learning rate of the cosine schedule, as a fraction of `lr`.
    min_lr_ratio: float = 0.1
    # Fraction of the steps spent warming the learning rate up linearly from 0.
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    # AdamW's implementation: auto | fused | foreach | for_loop | default (see AdamWImpl).
    adamw_impl: AdamWImpl = AdamWImpl.auto
    # Clip the global gradient norm to this value (0 = no clipping).
    max_grad_norm: float = 1.0
    # Dynamic batch size: form micro-batches by this token budget per worker instead of
    # micro_batch_size (samples are balanced across workers by tokens). null = off.
    max_tokens_per_micro_batch: Optional[int] = None
    # Pack each micro-batch into one row without padding (position ids restart per sample;
    # transformers keeps attention inside each sample): true, false, or auto (true for text runs,
    # where it removes the compute spent on padding; false for vision-language models, whose
    # processors lay images out per row, and for on-policy runs whose attn_implementation computes
    # across packed samples, as sdpa and eager do). Resolved when the run's models are known.
    packing: BoolOrAuto = "auto"
    # Save a sharded training checkpoint every this many steps (0: by time only).
    checkpoint_every: int = 0
    # Also save one when this many minutes have passed since the last (0 = never): a run killed at
    # any moment loses at most this much training, plus the step in progress. Runs shorter than
    # this write none; every stop where the weights are sound writes one anyway.
    checkpoint_minutes: float = 10.0
    # Keep this many newest checkpoints.
    keep_checkpoints: int = 2
    # Resume from a checkpoint directory, or a run directory (its newest complete checkpoint).
    resume: Optional[str] = None
    # An update whose loss or gradients are NaN or inf is skipped (no optimizer or scheduler
    # step; counted as skipped_steps in the metrics); after this many skipped steps in a row the
    # run stops with an error naming the step and its sample ids (1 = at the first one).
    max_bad_steps: int = 5
    # The run also stops once more than this fraction of its steps have been skipped (0: at the
    # first skipped step; 1: never for this reason).
    max_skipped_fraction: float = 0.1

    def check(self) -> None:
        check_bool_or_auto(self.packing, "packing")
        for name in ("epochs", "global_batch_size", "micro_batch_size", "lr", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be positive or -1 (train.epochs decides), got {self.max_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 = by time only), got {self.checkpoint_every}")
        if self.checkpoint_minutes < 0:
            raise ValueError(f"checkpoint_minutes must be >= 0 (0 = never), got {self.checkpoint_minutes}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ValueError(f"max_tokens_per_micro_batch must be positive or null, got {self.max_tokens_per_micro_batch}")


@dataclass
class EvalConfig(ConfigNode):
    """Held-out evaluation: KL(teacher || student), student CE, top-1 agreement."""

    # Evaluate before training (the baseline of the before/after table).
    before: bool = True
    # Evaluate every this many steps during training (0 = only before and after).
    every_steps: int = 0
    # Samples per evaluation forward pass.
    batch_size: int = 8
    # Keep the teacher's outputs for the eval set after the first evaluation (a frozen teacher
    # gives the same ones every time): later evaluations run the student only.
    cache_teacher: bool = True

    def check(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0 (0 = only before and after), got {self.every_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass
class PipelineConfig(ConfigNode):
    """How the controller keeps teacher and students busy."""

    # Global batches the teacher scores ahead while the students train (0 = strictly sequential).
    prefetch: int = 0
    # Teacher and students share the accelerators: between phases the teacher's weights and the
    # students' optimizer state leave the device (sleep/wake). Needs prefetch=0.
    colocate: bool = False

    def check(self) -> None:
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.colocate and self.prefetch:
            raise ValueError("colocate=true needs pipeline.prefetch=0: colocated teacher and students take turns on the devices")


@dataclass
class OnPolicyConfig(ConfigNode):
    """mode=onpolicy: the student learns on its own samples, scored by the teacher."""

    # Fraction of optimizer steps trained on student rollouts; the others use data.train's
    # responses (TRL GKD's lmbda). 1.0 = purely on-policy.
    lmbda: float = 1.0
    # Weights travel from the student to the rollout engine (and a self-distillation teacher)
    # in buckets of about this many MiB.
    sync_bucket_mb: int = 256
    # Warn (once) when the rollout engine's log-probabilities of the sampled tokens are further
    # than this from the trainer's (rollout_k3 in metrics.jsonl: mean k3 estimate of KL); null: never.
    agreement_warn_k3: Optional[float] = 1e-3

    def check(self) -> None:
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {self.lmbda}")
        if self.sync_bucket_mb < 1:
            raise ValueError(f"sync_bucket_mb must be positive, got {self.sync_bucket_mb}")
        if self.agreement_warn_k3 is not None and not self.agreement_warn_k3 >= 0:
            raise ValueError(f"agreement_warn_k3 must be >= 0 or null, got {self.agreement_warn_k3}")


@dataclass
class TransportConfig(ConfigNode):
    """How teacher outputs travel to the students."""

    # Transport (registry `transport`): inprocess, ray, or auto (follows the launcher).
    name: str = MISSING
    # Type of hidden states on the wire.
    dtype: HiddenDtype = HiddenDtype.bfloat16


@dataclass
class LauncherConfig(ConfigNode):
    """Where workers run."""

    # Launcher (registry `launcher`): local or ray.
    name: str = MISSING


@dataclass
class GenerateConfig(ConfigNode):
    """mode=generate: write model responses for the prompts of data.train."""

    # Output jsonl (null: generated.jsonl in the run directory).
    output: Optional[str] = None
    # Leave out responses cut by rollout.max_new_tokens (they are counted either way).
    drop_truncated: bool = True
