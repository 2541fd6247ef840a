"""Tiny end-to-end runs with a top-k or sampled teacher signal (teacher.signal), through kdlib.run.

The hf teacher computes each signal from its hidden states; the student learns from it through the
same chunked loss. A top-k signal of the whole vocabulary is the hidden-state run, step for step.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

import kdlib
from kdlib.demo.text import chat_rows, write_jsonl
from kdlib.errors import ConfigError


def _losses(result) -> list[tuple[float, float, float]]:
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["kd_loss"], r["grad_norm"]) for r in rows]


def test_topk_of_the_whole_vocabulary_is_the_hidden_state_run(tiny_overrides, tiny_llama, tmp_path):
    """Same losses and gradient norms at every step, to the bit: the student's weights follow the
    same path whether the teacher sends hidden states or its whole distribution as a top-k."""
    vocab = AutoConfig.from_pretrained(tiny_llama).vocab_size
    runs = {}
    for name, signal in (("hidden", []), ("topk", ["teacher.signal.kind=topk", f"teacher.signal.k={vocab}"])):
        cfg = kdlib.compose(tiny_overrides + signal + [f"output_dir={tmp_path / name}", "eval.before=false"])
        runs[name] = kdlib.run(cfg)
    assert _losses(runs["topk"]) == _losses(runs["hidden"])
    assert all(loss > 0 for loss, _, _ in _losses(runs["hidden"]))
    # held-out: the signal's KL estimate of a whole-vocabulary top-k is the exact KL
    after = runs["topk"].eval_after
    assert after["signal_kl"] == pytest.approx(runs["hidden"].eval_after["kl"], rel=1e-5)
    assert after["ce"] == runs["hidden"].eval_after["ce"]


@pytest.mark.parametrize("signal", [
    ["teacher.signal.kind=topk", "teacher.signal.k=8"],
    ["teacher.signal.kind=topk", "teacher.signal.k=8", "teacher.signal.tail_mass=false"],
    ["teacher.signal.kind=sampled", "teacher.signal.k=4"],
    ["teacher.signal.kind=sampled", "teacher.signal.k=4", "teacher.signal.proposal_temperature=2.0", "loss=jsd"],
])
def test_a_run_learns_from_a_sparse_signal(signal, tiny_overrides, tmp_path):
    """Pure KD on 8 rows and a global batch of 8: every step sees the same batch and, since a
    sample's draws are seeded by its content, the same signal, so the KD loss must fall."""
    data = write_jsonl(tmp_path / "train8.jsonl", chat_rows(8, seed=3))
    cfg = kdlib.compose(tiny_overrides + signal + [
        f"data.train={data}", "train.global_batch_size=8", "train.micro_batch_size=4", "train.epochs=3",
        "train.warmup_ratio=0", "train.lr=3e-3", "algorithm.kd_ratio=1.0",
    ])
    result = kdlib.run(cfg)
    losses = _losses(result)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(row)).all() for row in losses)
    kd = [row[1] for row in losses]
    assert kd[0] > kd[1] > kd[2] > 0
    after = result.eval_after
    assert {"signal_kl", "ce", "ece", "bits_per_byte"} <= set(after) and "kl" not in after
    assert after["signal_kl"] > 0 and 0 < after["ece"] < 1
    written = (result.run_dir / "config.yaml").read_text()
    assert f"kind: {signal[0].split('=')[1]}" in written


@pytest.mark.parametrize("overrides, message", [
    (["algorithm=uld", "teacher.signal.kind=topk"],
     "algorithm=uld learns from teacher.signal=hidden; teacher.signal.kind=topk is not one of them"),
    (["loss=akl", "teacher.signal.kind=sampled"],
     "loss=akl cannot use teacher.signal.kind=sampled: its weights need the teacher's whole distribution"),
    (["loss=hrl", "loss.topk=5", "teacher.signal.kind=topk", "teacher.signal.k=3"],
     "loss=hrl cannot use teacher.signal.kind=topk: it ranks the teacher's top 5 tokens; teacher.signal.k=3 is fewer"),
    (["loss=top1_ce", "teacher.signal.kind=sampled"],
     "loss=top1_ce cannot use teacher.signal.kind=sampled: it reads the teacher's most probable tokens"),
    (["loss.temperature=2.0", "teacher.signal.kind=topk"],
     "teacher.signal.kind=topk carries log-probabilities at temperature 1; loss.temperature=2 needs"),
    (["loss=rkl", "teacher.signal.kind=topk", "teacher.signal.tail_mass=false"],
     "loss=rkl on teacher.signal.kind=topk is not finite; set teacher.signal.tail_mass=true"),
    (["teacher.signal.kind=topk", "teacher.signal.k=0"], "teacher.signal.k must be >= 1, got 0"),
])
def test_an_undefined_pair_is_one_config_error_before_models_load(overrides, message, tmp_path):
    """Refused when the config composes, with a teacher path that does not exist: nothing loads."""
    with pytest.raises(ConfigError) as caught:
        kdlib.compose(["device=cpu", "teacher.model=/nonexistent/teacher", f"output_dir={tmp_path}"] + overrides)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_onpolicy_run_learns_from_a_sparse_signal(tiny_overrides, tmp_path):
    """On-policy: the teacher scores fresh rollouts and the student's KD loss is lower after 3
    steps on greedy rollouts of fixed prompts (top-k); draws for rollouts (samples without a content key) come
    from the teacher worker's own seeded generator, so a sampled run is reproducible."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", chat_rows(4, seed=7))
    common = tiny_overrides + [
        "+recipe=onpolicy", "loss=kl", f"data.train={prompts}", "train.global_batch_size=4", "train.epochs=3",
        "train.max_steps=3", "rollout.max_new_tokens=12", "rollout.temperature=0", "train.warmup_ratio=0",
    ]
    topk = _losses(kdlib.run(kdlib.compose(common + ["teacher.signal.kind=topk", "teacher.signal.k=8",
                                                     f"output_dir={tmp_path / 'topk'}"])))
    assert topk[0][1] > topk[2][1] > 0  # the rollouts move with the student: lower at the end, not monotone
    sampled = [_losses(kdlib.run(kdlib.compose(common + ["teacher.signal.kind=sampled", "teacher.signal.k=4",
                                                         f"output_dir={tmp_path / name}"]))) for name in "ab"]
    assert sampled[0] == sampled[1] and all(torch.isfinite(torch.tensor(row)).all() for row in sampled[0])
