"""Rollout-train agreement: every engine reports its sampled tokens' log-probabilities, the loss
engine records the trainer's as it runs, and the step's k3 / max |diff| follow their formulas.

The trainer's side is checked against a float64 log-softmax of the same logits (fused chunks,
the autograd path, the naive path; temperature 1, where it is the cross-entropy the engine already
computes, and another temperature); recording changes no loss or gradient. The engines' side:
plain generate and the decode engine report the same numbers, SGLang's ``output_token_logprobs``
are read and checked token by token. End to end, a float32 on-policy run measures k3 ~ 0, and an
engine whose weights were perturbed after the sync is caught (k3 above the bound, one warning).
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import kdlib
from kdlib.backends.hf.options import HFRolloutConfig, RolloutEngine
from kdlib.backends.hf.rollout import HFRolloutBackend
from kdlib.config.schema import LossConfig, StudentConfig
from kdlib.data.batching import collate
from kdlib.data.samples import Prompt, rollout_sample
from kdlib.demo.text import chat_rows, write_jsonl
from kdlib.losses import distillation_loss, target_logprobs
from kdlib.losses.engine import AutogradTerm, Plan, evaluate, even_chunks
from kdlib.models.head import LMHead
from kdlib.rollout_agreement import AgreementSums, AgreementWarning, agreement_metrics

N, H, V = 11, 8, 37


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).requires_grad_(True)
    head = LMHead(weight=(torch.randn(V, H, generator=g) * 0.5).requires_grad_(True))
    teacher = torch.randn(N, H, generator=g)
    teacher_head = LMHead(weight=torch.randn(V, H, generator=g) * 0.5)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[4] = -100  # an ignored row
    return hidden, head, teacher, teacher_head, targets


def _reference(hidden, head, targets, temperature):
    logits = hidden.detach().double() @ head.weight.detach().double().T / temperature
    picked = logits.log_softmax(-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return picked.masked_fill(targets == -100, math.nan)


@pytest.mark.parametrize("implementation", ["fused", "naive"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_rows_are_the_students_target_logprobs(implementation, temperature):
    hidden, head, teacher, teacher_head, targets = _inputs()
    cfg = LossConfig(name="rkl", implementation=implementation, chunk_size=3)
    with target_logprobs.recording(temperature) as recorded:
        distillation_loss(hidden, head, teacher, teacher_head, targets, cfg, kd_weight=1.0, ce_weight=0.0, normaliser=N)
    rows = recorded.rows(N)
    assert rows is not None and rows.dtype == torch.float32
    torch.testing.assert_close(rows.double(), _reference(hidden, head, targets, temperature), equal_nan=True,
                               rtol=0, atol=2e-6)


def test_recording_changes_no_loss_or_gradient():
    cfg = LossConfig(name="rkl", chunk_size=4)
    results = []
    for record in (False, True):
        hidden, head, teacher, teacher_head, targets = _inputs()
        if record:
            with target_logprobs.recording(0.7):
                terms = distillation_loss(hidden, head, teacher, teacher_head, targets, cfg, kd_weight=0.6,
                                          ce_weight=0.4, normaliser=N)
        else:
            terms = distillation_loss(hidden, head, teacher, teacher_head, targets, cfg, kd_weight=0.6, ce_weight=0.4,
                                      normaliser=N)
        terms.loss.backward()
        results.append((terms.loss.detach(), hidden.grad, head.weight.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))


class _SquareTerm(AutogradTerm):
    """A term on the general (autograd) path: the mean square of the chunk's logits."""

    teacher = {}

    def kd_sum(self, chunk, student, teacher):
        return student.logits.square().mean(-1).sum()


def test_the_autograd_path_records_too():
    hidden, head, _, _, targets = _inputs(1)
    plan = Plan(chunks=even_chunks(N, 4), head=head, term=_SquareTerm(), targets=targets, kd_weight=1.0, ce_weight=1.0)
    with target_logprobs.recording(1.0) as recorded:
        evaluate(plan, hidden, head.weight, None)[0].backward()
    torch.testing.assert_close(recorded.rows(N).double(), _reference(hidden, head, targets, 1.0), equal_nan=True,
                               rtol=0, atol=2e-6)
    assert target_logprobs.active() is None  # closed after the block


def test_k3_and_max_diff_follow_their_formulas():
    trainer = torch.tensor([-1.0, -0.5, math.nan, -2.0, -0.1], dtype=torch.float64)
    rollout = torch.tensor([-1.2, -0.5, -3.0, -1.5, math.nan], dtype=torch.float64)  # last row: not sampled by the engine
    sums = AgreementSums.of(trainer, rollout)
    r = [0.2, 0.0, -0.5]  # log p - log q over the rows both sides have
    assert sums.tokens == 3 and sums.unmeasured == 1
    assert sums.k3_sum == pytest.approx(sum(math.expm1(x) - x for x in r), rel=1e-12)
    assert sums.max_abs_diff == pytest.approx(0.5)
    other = AgreementSums.of(torch.tensor([-1.0]), torch.tensor([-1.0]))
    metrics = agreement_metrics([sums, other])
    assert metrics["rollout_k3"] == pytest.approx(sums.k3_sum / 4)
    assert metrics["rollout_logprob_max_abs_diff"] == pytest.approx(0.5)
    assert metrics["rollout_unmeasured_tokens"] == 1.0
    assert agreement_metrics([AgreementSums.of(None, rollout)]) == {}  # nothing compared: no metric


def test_the_warning_is_given_once(caplog):
    warning = AgreementWarning(1e-3)
    with caplog.at_level(logging.WARNING, logger="kdlib.rollout_agreement"):
        for step, k3 in enumerate([1e-5, 0.02, 0.5], start=1):
            warning.measured({"rollout_k3": k3, "rollout_logprob_max_abs_diff": 0.1, "loss": 1.0})
            warning.check(step)
    assert len(caplog.records) == 1 and "step 2" in caplog.text and "agreement_warn_k3" in caplog.text


def test_sampled_logprobs_reach_the_micro_batch_in_loss_row_order():
    prompt = Prompt(index=0, student_ids=[1, 10, 11])
    first, _ = rollout_sample(prompt, [20, 21, 2], max_len=64)
    first.rollout_logprobs = [-0.1, -0.2, -0.3]
    second, _ = rollout_sample(prompt, [30, 31], max_len=64)  # no engine log-probabilities
    for packing in (False, True):
        batch = collate([first, second], student_pad_id=0, packing=packing)
        assert batch.rollout_logprobs.shape[0] == batch.n_loss_tokens == 5
        torch.testing.assert_close(batch.rollout_logprobs[:3], torch.tensor([-0.1, -0.2, -0.3]))
        assert torch.isnan(batch.rollout_logprobs[3:]).all()
    assert collate([second], student_pad_id=0).rollout_logprobs is None


@pytest.mark.parametrize("sampling", [(1.0, 1.0), (0.7, 0.8), (0.0, 1.0)])
def test_plain_generate_and_the_decode_engine_report_the_same_logprobs(tiny_llama, sampling):
    temperature, top_p = sampling
    backend = HFRolloutBackend(StudentConfig(model=str(tiny_llama)), torch.device("cpu"), HFRolloutConfig())
    outs = {}
    for engine in ("generate", "static"):
        backend.cfg = HFRolloutConfig(engine=RolloutEngine(engine), temperature=temperature, top_p=top_p,
                                      max_new_tokens=10, batch_size=3, n_samples_per_prompt=2)
        outs[engine] = backend.generate([[5, 6, 7], [8, 9, 10, 11, 12]], stop_ids={1}, pad_id=0, seed=3, logprobs=True)
    pairs = [(a, b) for pa, pb in zip(outs["generate"], outs["static"]) for a, b in zip(pa, pb)]
    assert len(pairs) == 4
    for plain, engine in pairs:
        assert plain.token_ids == engine.token_ids and len(plain.logprobs) == len(plain.token_ids)
        torch.testing.assert_close(torch.tensor(plain.logprobs), torch.tensor(engine.logprobs), rtol=0, atol=2e-5)
    assert backend.generate([[5, 6, 7]], stop_ids={1}, pad_id=0, seed=3)[0][0].logprobs is None  # not asked


def test_sglang_output_token_logprobs_are_read_and_checked():
    from kdlib.backends.sglang.rollout import parse_generation
    from kdlib.errors import ModelError

    output = {"output_ids": [5, 6, 2, 9], "meta_info": {
        "finish_reason": {"type": "stop", "matched": 2},
        "output_token_logprobs": [(-0.5, 5, None), (-1.5, 6, None), (-0.25, 2, None), (-3.0, 9, None)]}}
    generation = parse_generation(output, {2}, 8, logprobs=True)
    assert generation.token_ids == [5, 6, 2] and generation.logprobs == [-0.5, -1.5, -0.25]
    output["meta_info"]["output_token_logprobs"][1] = (-1.5, 7, None)
    with pytest.raises(ModelError, match="output_token_logprobs"):
        parse_generation(output, {2}, 8, logprobs=True)


def _onpolicy(tiny_overrides, tmp_path, extra=()):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", chat_rows(4, seed=7))
    return kdlib.compose(tiny_overrides + [
        "+recipe=onpolicy", "loss=kl", f"data.train={prompts}", "data.eval=null", "train.global_batch_size=4",
        "train.max_steps=3", "rollout.max_new_tokens=8", "rollout.temperature=0.8", "train.warmup_ratio=0",
        "student.autocast=false", *extra,
    ])


def test_a_float32_run_agrees_and_a_perturbed_engine_is_caught(tiny_overrides, tmp_path, caplog):
    from kdlib.runner import built

    with built(_onpolicy(tiny_overrides, tmp_path), run_dir=tmp_path / "run") as loop:
        engine = loop.pipeline.rollout.group.workers[0].backend.model
        loop.start(1)
        batches = loop.sample_batches()
        agreed = loop.step(next(batches), 1)
        with torch.no_grad():  # the engine drifts from the trainer (as stale or low-precision weights would)
            for p in engine.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        with caplog.at_level(logging.WARNING, logger="kdlib.rollout_agreement"):
            drifted = loop.step(next(batches), 2)
    assert agreed["rollout_k3"] < 1e-6 and agreed["rollout_logprob_max_abs_diff"] < 1e-4
    assert drifted["rollout_k3"] > 1e-3 and "agreement_warn_k3" in caplog.text


def test_the_metrics_reach_metrics_jsonl(tiny_overrides, tmp_path):
    result = kdlib.run(_onpolicy(tiny_overrides, tmp_path, [f"output_dir={tmp_path / 'out'}"]))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 <= r["rollout_k3"] < 1e-6 for r in rows)
    assert all("rollout_logprob_max_abs_diff" in r for r in rows)
