"""The on-policy controller loop: the student learns on its own samples, scored by the teacher.

Per optimizer step: take ``train.global_batch_size / rollout.n_samples_per_prompt`` prompts of
data.train (seeded order), have the rollout engines (copies of the student) sample responses,
train on prompt + response with the loss on exactly the sampled response tokens (the teacher
scores the same ids, or its own privileged prompt + the same ids), then push the student's new
weights to the rollout engines. With ``onpolicy.lmbda < 1`` a seeded coin decides per step whether
the batch comes from rollouts or from data.train's own responses (TRL GKD's lmbda).

Across tokenizers (a cross-tokenizer algorithm) the student trains on its own sampled ids and the
teacher reads the text they spell, re-tokenised with its tokenizer after its own prompt, the two
aligned by byte offsets (:meth:`kdlib.data.cross_tokenizer.ResponseAligner.rollout`); this is the
only re-tokenisation anywhere. Sampled tokens that cannot be aligned (text that is not valid UTF-8)
are counted per step (``rollout_unaligned_tokens``) and trained by CE alone.

Every rollout is appended to ``rollouts.jsonl`` in the run directory (and the first
``logging.tracker_samples`` of each logged step go to the experiment trackers); one is logged
every ``rollout.print_every`` steps. Sampling is seeded per step, so a resumed run samples as the
uninterrupted one would.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Iterator

from kdlib.config.schema import KDConfig
from kdlib.controller import assembly
from kdlib.controller.training import TrainingLoop
from kdlib.data.batching import split_across_workers
from kdlib.data.samples import Prompt, Sample
from kdlib.errors import ConfigError

if TYPE_CHECKING:
    from kdlib.pipeline import Pipeline

log = logging.getLogger(__name__)


class OnPolicyMode(TrainingLoop):
    def __init__(self, pipeline: "Pipeline") -> None:
        super().__init__(pipeline)
        self._rollout_metrics: dict[str, float] = {}
        self._rollout_log = None
        self._broadcast = _weight_broadcast(pipeline)

    @classmethod
    def check(cls, cfg: KDConfig) -> None:
        super().check(cfg)
        if not 0.0 <= cfg.onpolicy.lmbda <= 1.0:
            raise ConfigError(f"onpolicy.lmbda must be in [0, 1], got {cfg.onpolicy.lmbda}")
        if cfg.pipeline.prefetch:
            raise ConfigError("mode=onpolicy needs pipeline.prefetch=0: each rollout needs the student's latest weights")
        if cfg.train.global_batch_size % cfg.rollout.n_samples_per_prompt:
            raise ConfigError(
                f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
                f"rollout.n_samples_per_prompt={cfg.rollout.n_samples_per_prompt} in mode=onpolicy"
            )

    @classmethod
    def build(cls, pipeline: "Pipeline") -> "OnPolicyMode":
        cfg = pipeline.cfg
        student, teacher = assembly.chat_encoders(cfg, with_teacher=True)
        pipeline.student_tokenizer = student.pretrained_files
        # off-policy steps (lmbda < 1) need the dataset's responses too
        pipeline.data = assembly.load_data(cfg, student, teacher, prompts=True, responses=cfg.onpolicy.lmbda < 1.0)
        prompts_per_step = cfg.train.global_batch_size // cfg.rollout.n_samples_per_prompt
        pipeline.total_steps = assembly.total_steps(cfg, len(pipeline.data.prompts), prompts_per_step, "prompts")
        if cfg.teacher.cache:  # serves the held-out evaluation and the dataset steps (lmbda < 1)
            assembly.open_teacher_cache(pipeline, teacher or student)
        assembly.start_launcher(pipeline)
        assembly.start_teacher(pipeline)
        assembly.start_rollout(pipeline, cfg.student, syncs_weights=True)
        # a compiled engine sizes its cache once for every prompt (one compile, not one per growth)
        longest = max((len(q.student_ids) for q in pipeline.data.prompts), default=0)
        pipeline.rollout.call("reserve", longest + cfg.rollout.max_new_tokens)
        assembly.start_students(pipeline, assembly.teacher_head(pipeline))
        return cls(pipeline)

    def sample_batches(self, skip: int = 0) -> Iterator[list[Sample]]:
        cfg = self.cfg
        per_step = cfg.train.global_batch_size // cfg.rollout.n_samples_per_prompt
        coin = random.Random(cfg.seed + 1)
        dataset = self.dataset_batches() if cfg.onpolicy.lmbda < 1.0 else None
        step = 0
        for epoch in itertools.count():  # the run's step count decides when to stop
            order = list(range(len(self.p.data.prompts)))
            if cfg.data.shuffle:
                random.Random(cfg.seed + epoch).shuffle(order)
            for start in range(0, len(order), per_step):
                step += 1
                on_policy = coin.random() < cfg.onpolicy.lmbda
                offline = None if on_policy else next(dataset)
                if step <= skip:
                    continue
                if on_policy:
                    yield self.rollout([self.p.data.prompts[i] for i in order[start : start + per_step]], step)
                else:
                    self._rollout_metrics = {"on_policy": 0.0}
                    yield offline

    def rollout(self, prompts: list[Prompt], step: int) -> list[Sample]:
        """Sample responses from the current student and turn them into training samples."""
        p, cfg = self.p, self.cfg
        encoder = p.data.student_encoder
        start = time.perf_counter()
        shares = split_across_workers(prompts, p.rollout.size)
        args = [
            ([q.student_ids for q in share], encoder.end_of_turn_ids, encoder.pad_id, cfg.seed + 1000 * step + rank)
            for rank, share in enumerate(shares)
        ]
        images = [p.data.rollout_images(share) for share in shares]  # None for text prompts
        if any(image is not None for image in images):
            results = p.rollout.call_each("generate_about_images", [(*a, i) for a, i in zip(args, images)])
        else:
            results = p.rollout.call_each("generate", args)
        generations = [g for worker in results for g in worker]
        samples, cut_by_max_len, truncated, lengths, unaligned = [], 0, 0, [], 0
        log_rows = []
        for prompt, outs in zip(prompts, generations, strict=True):
            for out in outs:
                sample, cut = p.data.rollout_sample(prompt, out.token_ids, cfg.data.max_len)
                samples.append(sample)
                cut_by_max_len += int(cut)
                unaligned += sample.alignment.unaligned_student if sample.alignment is not None else 0
                truncated += int(out.finish_reason == "length")
                lengths.append(len(out.token_ids))
                log_rows.append({
                    "step": step, "index": prompt.index, "prompt": prompt.conversation,
                    "response": encoder.tokenizer.decode(out.token_ids, skip_special_tokens=True),
                    "response_tokens": len(out.token_ids), "finish_reason": out.finish_reason,
                })
        self._write_rollouts(log_rows, step)
        self._rollout_metrics = {
            "on_policy": 1.0,
            "rollout_seconds": time.perf_counter() - start,
            "response_tokens_mean": sum(lengths) / max(len(lengths), 1),
            "rollouts_truncated": float(truncated),
            "rollouts_cut_by_max_len": float(cut_by_max_len),
        }
        if p.data.aligner is not None:
            self._rollout_metrics["rollout_unaligned_tokens"] = float(unaligned)
        return samples

    def start(self, first_step: int) -> None:
        super().start(first_step)
        self.sync_rollout()  # the engines start from the (possibly resumed) student

    def after_step(self, step: int) -> dict[str, float]:
        metrics = dict(self._rollout_metrics)
        metrics.update(super().after_step(step))
        metrics["sync_seconds"] = self.sync_rollout()
        return metrics

    def sync_rollout(self) -> float:
        """Push the student's weights to every rollout engine; seconds spent."""
        start = time.perf_counter()
        if self._broadcast is not None:
            self._broadcast.sync()
        else:
            handles = self.export_student_weights()
            self.p.rollout.call("load_weights", handles)
        return time.perf_counter() - start

    def _write_rollouts(self, rows: list[dict], step: int) -> None:
        if self.p.run_dir is None:
            return
        if self._rollout_log is None:
            self._rollout_log = (self.p.run_dir / "rollouts.jsonl").open("a", encoding="utf-8")
        for row in rows:
            self._rollout_log.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._rollout_log.flush()
        if step % self.cfg.logging.log_every == 0:
            self.p.trackers.log_samples(rows[: self.cfg.logging.tracker_samples], step)
        every = self.cfg.rollout.print_every
        if every and step % every == 0 and rows:
            row = rows[0]
            prompt = row["prompt"][-1]["content"] if row["prompt"] else ""
            log.info("step %d rollout (%s, %d tokens)\n  prompt: %s\n  response: %s",
                     step, row["finish_reason"], row["response_tokens"], prompt, row["response"])


def _weight_broadcast(pipeline: "Pipeline"):
    """``rollout.sglang.weight_sync=distributed``: the broadcast that replaces transport buckets."""
    from kdlib.config.schema import SGLangRolloutConfig, WeightSync

    rollout = pipeline.cfg.rollout
    if not isinstance(rollout, SGLangRolloutConfig) or rollout.sglang.weight_sync is not WeightSync.distributed:
        return None
    from kdlib.hardware import resolve_device_type
    from kdlib.rollout.sglang_sync import DistributedWeightSync

    backend = "nccl" if resolve_device_type(pipeline.cfg.device) == "cuda" else "gloo"
    return DistributedWeightSync(pipeline.student, pipeline.rollout, pipeline.cfg.onpolicy.sync_bucket_mb * 2**20,
                                 rollout.sglang.tp_size, backend)
