"""The typed configuration of a kdlib run: the one source of truth for keys, types and defaults.

Every option a user can set is a field of a dataclass below, with a comment saying what it does.
Hydra composes YAML files from ``conf/`` (which only choose and fill values: model paths, sizes,
recipe overrides) on top of these dataclasses, so a wrong key or type fails at composition, before
any model loads. Groups whose options are implementations (loss, algorithm, launcher, transport,
rollout) get their options from the registries: each registered name contributes its own config
subclass, so ``loss=jsd loss.beta=0.3`` is typed without any YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING


class Precision(str, Enum):
    """Floating-point type of model weights and computation."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    # bfloat16 where the device computes it natively (CUDA with bf16, CPUs with AVX-512-BF16 or
    # AMX), float32 elsewhere; resolved when the config is composed (see auto_choices).
    auto = "auto"


class HiddenDtype(str, Enum):
    """Type of the teacher hidden states on the wire (never float16: it overflows)."""

    bfloat16 = "bfloat16"
    float32 = "float32"


class Mode(str, Enum):
    """Which controller loop runs."""

    offpolicy = "offpolicy"  # distil on a fixed dataset (teacher scores the dataset's responses)
    onpolicy = "onpolicy"  # the student samples responses, the teacher scores them, the student learns
    sft = "sft"  # supervised fine-tuning on the dataset's responses, no teacher (algorithm sft)
    generate = "generate"  # write teacher responses for the dataset's prompts (sequence-level KD data)
    cache = "cache"  # only fill teacher.cache with the teacher's outputs for data.train and data.eval


class DataFormat(str, Enum):
    """Layout of a dataset row."""

    auto = "auto"  # detected from the dataset's columns
    messages = "messages"  # OpenAI chat: [{"role": ..., "content": ...}, ...]
    prompt_response = "prompt_response"  # two text columns (data.prompt_key, data.response_key)
    alpaca = "alpaca"  # instruction / input / output
    sharegpt = "sharegpt"  # conversations: [{"from": "human"|"gpt"|"system", "value": ...}]


class Overlong(str, Enum):
    """What happens to a sample longer than ``data.max_len`` tokens."""

    truncate = "truncate"  # cut the response (never the prompt) to fit; counted in the log
    drop = "drop"  # leave the sample out; counted in the log


class Unalignable(str, Enum):
    """What happens to a sample whose response cannot be aligned across two tokenizers (its text
    differs between the two renderings, or tokens that cannot be placed in it exactly)."""

    error = "error"  # stop with a one-line error naming the row and the model
    drop = "drop"  # leave the sample out; counted in the log and data_report.json


class BadImages(str, Enum):
    """What happens to a row whose image is missing, unreadable, too large or remote."""

    error = "error"  # stop with a one-line error naming the data file, row and image
    drop = "drop"  # leave the row out; counted by cause in the filter report


class LossImplementation(str, Enum):
    """How the KD loss is computed from hidden states."""

    fused = "fused"  # chunked over tokens, never materialises [tokens, vocab] logits
    naive = "naive"  # full logits of the micro-batch, then the divergence (reference path)


@dataclass
class ModelConfig:
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
class FSDPConfig:
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


# What an SGLang engine can release and take back (sglang.srt.constants GPU_MEMORY_TYPE_*).
SGLANG_MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")


class WeightSync(str, Enum):
    """How the student's weights reach SGLang rollout engines after every optimizer step."""

    # Buckets through kdlib's transport, loaded with Engine.update_weights_from_tensor: engines
    # that share the students' GPUs (colocated), or any placement the transport reaches.
    tensor = "tensor"
    # Broadcast from student rank 0 into the engines over NCCL (gloo on CPU):
    # init_weights_update_group + update_weights_from_distributed; engines on their own GPUs.
    distributed = "distributed"


@dataclass
class SGLangEngineConfig:
    """Options of one SGLang ``Engine`` (teacher or rollout), passed to it as ServerArgs fields.

    kdlib sets the fields its protocol depends on itself (model path, dtype, hidden-state return,
    radix cache, chunked prefill, memory saver, seed); ``server_args`` adds any other field.
    """

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

    def check(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if self.context_length is not None and self.context_length < 1:
            raise ValueError(f"context_length must be positive, got {self.context_length}")


@dataclass
class SGLangTeacherConfig(SGLangEngineConfig):
    """teacher.backend=sglang: one SGLang Engine per teacher worker, prefill only, hidden states out."""

    # What the engine releases while the students train: any of kv_cache, weights, cuda_graph;
    # null: all three with pipeline.colocate, none otherwise (resolved at composition).
    offload_tags: Optional[list[str]] = None
    # Keep a host copy of the weights while they are released; without it SGLang resumes with
    # lost weights (the teacher is never re-synced), so offloading weights requires it.
    weights_cpu_backup: bool = True
    # Also send the engine's own top-k log-probabilities at every loss row (0 = off).
    top_logprobs_num: int = 0

    def check(self) -> None:
        super().check()
        tags = self.offload_tags or []
        unknown = sorted(set(tags) - set(SGLANG_MEMORY_TAGS))
        if unknown:
            raise ValueError(f"offload_tags: unknown {unknown}; choose among {list(SGLANG_MEMORY_TAGS)}")
        if "weights" in tags and not self.weights_cpu_backup:
            raise ValueError(
                "offload_tags has weights but weights_cpu_backup=false: SGLang would resume the "
                "teacher with lost weights; keep the backup or drop weights from offload_tags"
            )
        if self.top_logprobs_num < 0:
            raise ValueError(f"top_logprobs_num must be >= 0, got {self.top_logprobs_num}")


@dataclass
class SGLangRolloutOptions(SGLangEngineConfig):
    """Options of the SGLang rollout engines (rollout=sglang)."""

    # How the student's weights reach the engines after every step: tensor or distributed.
    weight_sync: WeightSync = WeightSync.tensor
    # Release the engine's GPU memory (weights, KV cache, CUDA graphs) after every generation and
    # take it back at the next weight sync: for engines sharing their GPUs with the students.
    release_memory: bool = False
    # SGLang's deterministic inference, each sample seeded from kdlib's seed (slower).
    deterministic: bool = False


@dataclass
class TeacherConfig(ModelConfig):
    """The model that only runs forward passes and sends hidden states."""

    # Inference backend (registry `teacher backend`): hf or sglang.
    backend: str = "hf"
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
    # Options of teacher.backend=sglang.
    sglang: SGLangTeacherConfig = field(default_factory=SGLangTeacherConfig)


@dataclass
class LoraConfig:
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
class FreezeConfig:
    """Student weights kept fixed while the rest trains (full fine-tuning of the rest)."""

    # Keep the input embeddings fixed (and a head tied to them).
    embeddings: bool = False
    # Keep the first this many decoder layers (of the pruned student) fixed.
    first_layers: int = 0


@dataclass
class StudentConfig(ModelConfig):
    """The model that trains."""

    # Depth-prune the loaded model to this many decoder layers, evenly spaced, first and last kept.
    num_layers: Optional[int] = None
    # Depth-prune to exactly these decoder layer indices (overrides num_layers).
    keep_layers: Optional[list[int]] = None
    # Number of data-parallel student workers (more than one needs launcher=ray).
    num_workers: int = 1
    # Recompute activations in the backward pass to save memory.
    gradient_checkpointing: bool = False
    # Vision-language students: keep the vision tower and its projector frozen (only the language
    # model and head train); false trains them too. Text-only students have nothing to freeze.
    freeze_vision: bool = True
    # Run the student's matrix products in bfloat16 under torch.autocast; weights, optimizer
    # state and the KD/CE loss stay in `dtype` (mixed precision). true, false, or auto (true
    # where bf16 is native on the device, see Precision.auto; resolved at composition).
    autocast: Any = False
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


@dataclass
class AlgorithmConfig:
    """Base of every algorithm's config; `name` selects the registry entry.

    Subclasses may define ``check(self)`` raising ValueError for values their types allow but the
    algorithm does not (e.g. a ratio outside [0, 1]); composition calls it.
    """

    name: str = MISSING


@dataclass
class LossConfig:
    """Base of every divergence's config; subclasses add the divergence's own parameters.

    Like algorithm configs, a subclass may define ``check(self)`` to validate its parameters.
    """

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


class RolloutEngine(str, Enum):
    """How the hf rollout backend decodes (all sample the model's own distribution)."""

    # `static` when the model passes the engine's checks (static KV cache decoding reproduces its
    # full forward), else `generate`, with the reason logged once
    auto = "auto"
    # transformers' model.generate as is (dynamic KV cache): the reference
    generate = "generate"
    # kdlib's decode loop on generate's preparation: static KV cache kept across calls, batched
    # prefill, a faster head product; same processors and random draws as generate
    static = "static"
    # `static` with the decode step compiled by torch.compile (inductor); compile time is paid
    # on the first call of each batch size
    compiled = "compiled"
    # `compiled` with the weights frozen into the compiled step (inductor's freezing and its C++
    # GEMM kernels, which pack the weights once): the fastest decoding on CPU; loading new weights
    # (on-policy sync) packs them again in place. Its first call compiles for tens of seconds.
    frozen = "frozen"


class RolloutSampler(str, Enum):
    """How kdlib's rollout engines draw a token from the processed distribution."""

    # torch.multinomial, as generate draws (one exponential variate per vocabulary entry), so a
    # seed gives generate's tokens
    multinomial = "multinomial"
    # one float64 uniform per row against the cumulative distribution: the same distribution,
    # far fewer random numbers (about 4 ms less per step for 4 rows of a 49k vocabulary on CPU),
    # but other tokens than generate's for a given seed
    inverse_cdf = "inverse_cdf"


@dataclass
class RolloutConfig:
    """Sampling settings for generation (teacher data synthesis, student rollouts)."""

    # Generation backend (registry `rollout backend`): hf or sglang.
    backend: str = "hf"
    # Decoding engine of the hf backend: auto | generate | static | compiled | frozen (see RolloutEngine).
    engine: RolloutEngine = RolloutEngine.auto
    # Token draw of kdlib's engines (static, compiled, frozen): multinomial | inverse_cdf (see RolloutSampler).
    sampler: RolloutSampler = RolloutSampler.multinomial
    # Longest response, in tokens; longer ones are cut and counted as truncated.
    max_new_tokens: int = 256
    # Sampling temperature; 0 means greedy decoding.
    temperature: float = 1.0
    # Nucleus sampling threshold (1.0 = off).
    top_p: float = 1.0
    # Prompts per generate() call.
    batch_size: int = 16
    # Responses sampled per prompt.
    n_samples_per_prompt: int = 1
    # Rollout engines (more than one needs launcher=ray).
    num_workers: int = 1
    # Log one sampled prompt and response every this many steps (0 = never); every rollout is
    # written to rollouts.jsonl in the run directory either way.
    print_every: int = 0


@dataclass
class SGLangRolloutConfig(RolloutConfig):
    """rollout=sglang: the rollout options above, sampled by SGLang engines."""

    backend: str = "sglang"
    # Options of the SGLang engines.
    sglang: SGLangRolloutOptions = field(default_factory=SGLangRolloutOptions)


@dataclass
class DataConfig:
    """Where samples come from and how they become token batches."""

    # Training data: a .jsonl/.json/.parquet file, a saved dataset directory, a hub dataset name,
    # or pkg://<package>/<file>.
    train: str = MISSING
    # Held-out data for evaluation (same forms as `train`); null skips evaluation.
    eval: Optional[str] = None
    # Split names used for hub datasets and saved DatasetDicts.
    train_split: str = "train"
    eval_split: str = "train"
    # Row layout; auto detects it from the columns.
    format: DataFormat = DataFormat.auto
    # Column names for the formats that need them.
    messages_key: str = "messages"
    prompt_key: str = "prompt"
    response_key: str = "response"
    # Longest sample in tokens (prompt + response).
    max_len: int = 1024
    # What to do with longer samples.
    overlong: Overlong = Overlong.truncate
    # Cross-tokenizer algorithms: what to do with a sample whose response cannot be aligned
    # between the two tokenizers.
    unalignable: Unalignable = Unalignable.error
    # Use at most this many training rows (null = all).
    max_samples: Optional[int] = None
    # Use at most this many evaluation rows (null = all).
    eval_max_samples: Optional[int] = None
    # Shuffle training samples every epoch (seeded).
    shuffle: bool = True
    # Render conversations with each model's chat template; false joins the turns with newlines.
    apply_chat_template: bool = True
    # Privileged context: the column holding the teacher's own prompt (text replacing the last
    # user message, or a list of messages replacing the whole prompt); the student keeps its
    # prompt and both score the same response. null = the teacher reads the student's prompt.
    teacher_input_key: Optional[str] = None
    # Image+text data (vision-language models; see docs/vlm.md). Largest image accepted, in pixels
    # (width x height, read from the file header before decoding); larger ones are bad images.
    # null = no limit.
    max_image_pixels: Optional[int] = 8192 * 8192
    # What happens to a row whose image is missing, unreadable, larger than max_image_pixels or
    # remote (http; never downloaded): error (one line naming file, row and image) or drop (counted).
    bad_images: BadImages = BadImages.error
    # The text marking an image's place in text content (LLaVA / ShareGPT rows, string messages).
    image_placeholder: str = "<image>"
    # Column of image references for rows whose text uses placeholders or value-less image parts.
    images_key: str = "images"


ADAMW_IMPLS = ("auto", "fused", "foreach", "for_loop")


@dataclass
class TrainConfig:
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
    # AdamW's implementation: fused (one kernel per parameter group: on a CPU the update of a
    # 64M-parameter student takes ~33 ms instead of the loop's ~174 ms), foreach, for_loop, or auto
    # (fused where torch has the kernel for every parameter's device and dtype, else torch's default).
    adamw_impl: str = "auto"
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
    packing: Any = "auto"
    # Save a sharded training checkpoint every this many steps (0 = never).
    checkpoint_every: int = 0
    # Keep this many newest checkpoints.
    keep_checkpoints: int = 2
    # Resume from a checkpoint directory, or a run directory (its newest complete checkpoint).
    resume: Optional[str] = None
    # An update whose loss or gradients are NaN or inf is skipped (no optimizer or scheduler
    # step; counted as skipped_steps in the metrics); after this many skipped steps in a row the
    # run stops with an error naming the step and its sample ids (1 = at the first one).
    max_bad_steps: int = 5


@dataclass
class EvalConfig:
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


@dataclass
class PipelineConfig:
    """How the controller keeps teacher and students busy."""

    # Global batches the teacher scores ahead while the students train (0 = strictly sequential).
    prefetch: int = 0
    # Teacher and students share the accelerators: between phases the teacher's weights and the
    # students' optimizer state leave the device (sleep/wake). Needs prefetch=0.
    colocate: bool = False


@dataclass
class OnPolicyConfig:
    """mode=onpolicy: the student learns on its own samples, scored by the teacher."""

    # Fraction of optimizer steps trained on student rollouts; the others use data.train's
    # responses (TRL GKD's lmbda). 1.0 = purely on-policy.
    lmbda: float = 1.0
    # Weights travel from the student to the rollout engine (and a self-distillation teacher)
    # in buckets of about this many MiB.
    sync_bucket_mb: int = 256


@dataclass
class TransportConfig:
    """How teacher outputs travel to the students."""

    # Transport (registry `transport`): inprocess, ray, or auto (follows the launcher).
    name: str = MISSING
    # Type of hidden states on the wire.
    dtype: HiddenDtype = HiddenDtype.bfloat16


@dataclass
class LauncherConfig:
    """Where workers run."""

    # Launcher (registry `launcher`): local.
    name: str = MISSING


class WandbMode(str, Enum):
    """Where a Weights & Biases run goes."""

    online = "online"  # to the W&B server as the run goes
    offline = "offline"  # a local run directory that `wandb sync` uploads later
    disabled = "disabled"  # nowhere (the calls do nothing)


@dataclass
class WandbConfig:
    """Options of the Weights & Biases tracker (logging.trackers=[wandb])."""

    # Project the runs go to.
    project: str = "kdlib"
    # Team or user; null = the account's default entity.
    entity: Optional[str] = None
    # online, offline or disabled; null = W&B's own choice (WANDB_MODE, else online).
    mode: Optional[WandbMode] = None
    # Runs shown together; null = the Hydra sweep of a -m run (none for a single run).
    group: Optional[str] = None
    # Tags of the run.
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    """What the run reports."""

    # Show a progress bar over steps.
    progress: bool = True
    # Write a metrics line (and update the progress bar) every this many steps.
    log_every: int = 1
    # Draw loss curves into plots/loss.png at the end.
    plot: bool = True
    # Experiment trackers (registry `tracker`: wandb, tensorboard) that receive every metrics
    # line, the resolved config, the eval table, the loss plot and on-policy rollout samples;
    # metrics.jsonl is written either way.
    trackers: list[str] = field(default_factory=list)
    # Options of the W&B tracker.
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # On-policy: rollouts of each logged step sent to the trackers as samples (all of them go to
    # rollouts.jsonl).
    tracker_samples: int = 4


@dataclass
class GenerateConfig:
    """mode=generate: write model responses for the prompts of data.train."""

    # Output jsonl (null: generated.jsonl in the run directory).
    output: Optional[str] = None
    # Leave out responses cut by rollout.max_new_tokens (they are counted either way).
    drop_truncated: bool = True


@dataclass
class KDConfig:
    """A whole run. `kdlib.compose()` returns one; `kdlib.run()` takes one."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    # Registry-backed groups: their node types come from the selected option.
    algorithm: Any = MISSING
    loss: Any = MISSING
    transport: Any = MISSING
    launcher: Any = MISSING
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
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
    # Save the final student (Hugging Face format) into <run dir>/student.
    save_student: bool = True
    # Filled at composition, not set by users: what each `auto` value resolved to, and why.
    auto_choices: dict[str, str] = field(default_factory=dict)
