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

With a reward (``reward=<name>``) every rollout is scored and gets its group-normalised advantage
(:class:`kdlib.rewards.scoring.RolloutScorer`); the step's metrics add ``reward_mean``,
``reward_group_std`` and ``reward_seconds``, and each evaluation adds the held-out ``reward``.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Iterator

from kdlib.backends import WEIGHT_SYNCS
from kdlib.config.schema import KDConfig
from kdlib.controller.mode import Needs, TeacherNeed
from kdlib.controller.training import TrainingLoop
from kdlib.data.batching import split_across_workers
from kdlib.data.samples import Prompt, Sample, build_prompts
from kdlib.errors import ConfigError
from kdlib.rewards.scoring import RolloutScorer
from kdlib.rollout_agreement import AgreementWarning
from kdlib.tracking.records import keep_steps

if TYPE_CHECKING:
    from kdlib.backends.base import Generation
    from kdlib.controller.training import PreparedStep
    from kdlib.pipeline import Pipeline

log = logging.getLogger(__name__)


class OnPolicyMode(TrainingLoop):
    def __init__(self, pipeline: "Pipeline") -> None:
        super().__init__(pipeline)
        self.rollout_engines = pipeline.rollout
        self._rollout_metrics: dict[str, float] = {}
        self._rollout_log = None
        self._agreement = AgreementWarning(self.cfg.onpolicy.agreement_warn_k3)
        self._weight_sync = WEIGHT_SYNCS.get(self.cfg.rollout.weight_sync_strategy())(
            self.students, self.rollout_engines, self.cfg)
        # a compiled engine sizes its cache once for every prompt (one compile, not one per growth)
        longest = max((len(q.student_ids) for q in self.data.prompts), default=0)
        self.scorer, self.eval_prompts = None, []
        if self.cfg.reward.enabled:
            self.scorer = RolloutScorer(self.cfg.reward, self.cfg.rollout.n_samples_per_prompt, self._decode)
            if self.cfg.data.eval and self.cfg.reward.eval_prompts:
                self.eval_prompts, report = build_prompts(self.cfg.data, self.data.student_encoder, split="eval")
                log.info("held-out reward prompts: %s", report.summary())
                self.evaluate = HeldoutReward(self.evaluate, self.heldout_reward)
            longest = max([longest, *(len(q.student_ids) for q in self.eval_prompts)])
        self.rollout_engines.reserve(longest + self.cfg.rollout.max_new_tokens)

    @classmethod
    def check(cls, cfg: KDConfig) -> None:
        super().check(cfg)
        if cfg.pipeline.prefetch:
            raise ConfigError("mode=onpolicy needs pipeline.prefetch=0: each rollout needs the student's latest weights")
        if cfg.train.global_batch_size % cfg.rollout.n_samples_per_prompt:
            raise ConfigError(
                f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
                f"rollout.n_samples_per_prompt={cfg.rollout.n_samples_per_prompt} in mode=onpolicy"
            )

    @classmethod
    def needs(cls, cfg: KDConfig) -> Needs:
        # off-policy steps (lmbda < 1) need the dataset's responses too; a teacher cache serves
        # the held-out evaluation and those steps, never the rollouts
        return Needs(responses=cfg.onpolicy.lmbda < 1.0, prompts=True, teacher=TeacherNeed.always, students=True,
                     rollout="student")

    def sample_batches(self, skip: int = 0) -> Iterator[list[Sample]]:
        cfg = self.cfg
        per_step = cfg.train.global_batch_size // cfg.rollout.n_samples_per_prompt
        coin = random.Random(cfg.seed + 1)
        dataset = self.dataset_batches() if cfg.onpolicy.lmbda < 1.0 else None
        step = 0
        for epoch in itertools.count():  # the run's step count decides when to stop
            order = list(range(len(self.data.prompts)))
            if cfg.data.shuffle:
                random.Random(cfg.seed + epoch).shuffle(order)
            for start in range(0, len(order), per_step):
                step += 1
                on_policy = coin.random() < cfg.onpolicy.lmbda
                offline = None if on_policy else next(dataset)
                if step <= skip:
                    continue
                if on_policy:
                    yield self.rollout([self.data.prompts[i] for i in order[start : start + per_step]], step)
                else:
                    self._rollout_metrics = {"on_policy": 0.0}
                    yield offline

    def rollout(self, prompts: list[Prompt], step: int) -> list[Sample]:
        """Sample responses from the current student and turn them into training samples."""
        cfg, data = self.cfg, self.data
        start = time.perf_counter()
        generations = self.sample(prompts, cfg.seed + 1000 * step)
        texts = [self._decode(out.token_ids) for outs in generations for out in outs]
        samples, cut_by_max_len, truncated, lengths, unaligned = [], 0, 0, [], 0
        log_rows = []
        for prompt, outs in zip(prompts, generations, strict=True):
            for out in outs:
                sample, cut = data.rollout_sample(prompt, out.token_ids, cfg.data.max_len)
                if out.logprobs is not None:
                    sample.rollout_logprobs = out.logprobs[: sample.student.n_loss_tokens]
                samples.append(sample)
                cut_by_max_len += int(cut)
                unaligned += sample.alignment.unaligned_student if sample.alignment is not None else 0
                truncated += int(out.finish_reason == "length")
                lengths.append(len(out.token_ids))
                log_rows.append({
                    "step": step, "index": prompt.index, "prompt": prompt.conversation,
                    "response": texts[len(log_rows)],
                    "response_tokens": len(out.token_ids), "finish_reason": out.finish_reason,
                })
        scored: dict[str, float] = {}
        if self.scorer is not None:
            rewards, scored = self.scorer.score_step(prompts, generations, texts, samples)
            for row, sample, reward in zip(log_rows, samples, rewards, strict=True):
                row.update(reward=reward, advantage=sample.advantage)
        self._write_rollouts(log_rows, step)
        self._rollout_metrics = {
            "on_policy": 1.0,
            "rollout_seconds": time.perf_counter() - start,
            "response_tokens_mean": sum(lengths) / max(len(lengths), 1),
            "rollouts_truncated": float(truncated),
            "rollouts_cut_by_max_len": float(cut_by_max_len),
        }
        if data.aligner is not None:
            self._rollout_metrics["rollout_unaligned_tokens"] = float(unaligned)
        self._rollout_metrics.update(scored)
        return samples

    def sample(self, prompts: list[Prompt], seed: int) -> list[list["Generation"]]:
        """``rollout.n_samples_per_prompt`` responses per prompt from the current student, the
        prompts split across the engines (engine ``rank`` seeded ``seed + rank``)."""
        encoder = self.data.student_encoder
        shares = split_across_workers(prompts, self.rollout_engines.size)
        results = self.rollout_engines.generate(
            [[q.student_ids for q in share] for share in shares], encoder.end_of_turn_ids, encoder.pad_id,
            [seed + rank for rank in range(len(shares))],
            [self.data.rollout_images(share) for share in shares],  # None for text prompts
        )
        return [g for worker in results for g in worker]

    def heldout_reward(self) -> float:
        """Mean reward of the current student's samples on the held-out prompts (fixed seed)."""
        return self.scorer.heldout(self.eval_prompts, self.sample, self.cfg.seed)

    def _decode(self, token_ids: list[int]) -> str:
        return self.data.student_encoder.tokenizer.decode(token_ids, skip_special_tokens=True)

    def progress_fields(self, metrics: dict) -> dict[str, float]:
        fields = super().progress_fields(metrics)
        if "reward_mean" in metrics:
            fields["reward"] = metrics["reward_mean"]
        return fields

    def start(self, first_step: int) -> None:
        super().start(first_step)
        if first_step > 1:  # resumed: the rollouts of steps after the checkpoint are sampled again
            keep_steps(self.run_dir / "rollouts.jsonl", first_step - 1)
        self.sync_rollout()  # the engines start from the (possibly resumed) student

    def train(self, prepared: "PreparedStep") -> dict[str, Any]:
        metrics = super().train(prepared)
        self._agreement.measured(metrics)
        return metrics

    def after_step(self, step: int) -> dict[str, float]:
        self._agreement.check(step)
        metrics = dict(self._rollout_metrics)
        metrics.update(super().after_step(step))
        metrics["sync_seconds"] = self.sync_rollout()
        return metrics

    def sync_rollout(self) -> float:
        """Push the student's weights to every rollout engine; seconds spent."""
        start = time.perf_counter()
        self._weight_sync.sync()
        return time.perf_counter() - start

    def _write_rollouts(self, rows: list[dict], step: int) -> None:
        if self._rollout_log is None:
            self._rollout_log = (self.run_dir / "rollouts.jsonl").open("a", encoding="utf-8")
        for row in rows:
            self._rollout_log.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._rollout_log.flush()
        if step % self.cfg.logging.log_every == 0:
            self.trackers.log_samples(rows[: self.cfg.logging.tracker_samples], step)
        every = self.cfg.rollout.print_every
        if every and step % every == 0 and rows:
            row = rows[0]
            prompt = row["prompt"][-1]["content"] if row["prompt"] else ""
            log.info("step %d rollout (%s, %d tokens)\n  prompt: %s\n  response: %s",
                     step, row["finish_reason"], row["response_tokens"], prompt, row["response"])


class HeldoutReward:
    """The held-out evaluation plus the held-out reward (``reward`` in its results)."""

    def __init__(self, evaluate, reward) -> None:
        self.evaluate = evaluate
        self.reward = reward

    def invalidate(self) -> None:
        self.evaluate.invalidate()

    def __call__(self) -> dict[str, float]:
        return {**(self.evaluate() or {}), "reward": self.reward()}
