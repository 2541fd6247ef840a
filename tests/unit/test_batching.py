"""Batches: every sample used once per epoch, shares balanced, teacher work balanced by tokens,
and the objective independent of how a global batch is split into micro-batches."""

from __future__ import annotations

import pytest
import torch

import kdlib
from kdlib.data.batching import assign_by_cost as assign_by_tokens
from kdlib.data.batching import global_batches, micro_batches, split_across_workers
from kdlib.data.samples import Sample, Sequence


def _samples(n):
    return [Sample(index=i, student=Sequence(list(range(3 + i % 5)), 2)) for i in range(n)]


def test_global_batches_cover_every_sample_once_per_epoch():
    samples = _samples(11)
    batches = list(global_batches(samples, batch_size=4, epochs=2, shuffle=True, seed=0))
    assert [len(b) for b in batches] == [4, 4, 3, 4, 4, 3]
    for epoch in (batches[:3], batches[3:]):
        assert sorted(s.index for b in epoch for s in b) == list(range(11))
    assert [s.index for s in batches[0]] != [s.index for s in batches[3]]  # reshuffled per epoch
    again = list(global_batches(samples, batch_size=4, epochs=2, shuffle=True, seed=0))
    assert [[s.index for s in b] for b in again] == [[s.index for s in b] for b in batches]


def test_split_across_workers_loses_nothing():
    batch = _samples(7)
    shares = split_across_workers(batch, 3)
    assert [len(s) for s in shares] == [3, 2, 2]
    assert [s.index for share in shares for s in share] == list(range(7))
    assert [len(m) for m in micro_batches(batch, 3)] == [3, 3, 1]


def test_assign_by_tokens_balances_load():
    costs = [100, 10, 90, 20, 80, 30]
    assignment = assign_by_tokens(costs, 2)
    assert sorted(i for a in assignment for i in a) == list(range(6))
    loads = [sum(costs[i] for i in a) for a in assignment]
    assert max(loads) - min(loads) <= 10


def test_gradient_accumulation_does_not_change_the_step(tiny_overrides):
    """Same global batch, micro-batches of 8 vs 3: identical loss and identical gradients.

    (Gradients, not updated weights: Adam's first step is lr * sign(g) where g is ~0, so float
    noise in near-zero gradients flips single weights by 2 * lr.)"""
    from kdlib.runner import built

    results, grads = [], []
    for micro in (8, 3):
        cfg = kdlib.compose(tiny_overrides + ["train.global_batch_size=8", f"train.micro_batch_size={micro}", "loss.implementation=naive", "eval.before=false"])
        with built(cfg, run_dir=None) as loop:
            results.append(loop.step(loop.pipeline.data.train[:8]))
            grads.append(loop.pipeline.students.group.workers[0].model.model.layers[0].mlp.up_proj.weight.grad.clone())
    for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-5), key
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_plan_pads_shorter_workers_with_weight_zero_copies():
    from kdlib.data.batching import plan_step

    plan = plan_step(_samples(5), 2, micro_batch_size=2)
    assert [len(entries) for entries in plan.per_worker] == [2, 2]
    assert plan.padding == 1
    real = [i for entries in plan.per_worker for i, w in entries if w]
    assert sorted(s.index for i in real for s in plan.micro_batches[i]) == list(range(5))
    # a padding entry repeats one of its own worker's batches
    (pad_index, _), = [(i, w) for i, w in plan.per_worker[1] if w == 0.0]
    assert pad_index in [i for i, w in plan.per_worker[1] if w]


def test_plan_with_a_token_budget_balances_tokens():
    from kdlib.data.batching import plan_step

    samples = _samples(12)
    plan = plan_step(samples, 2, micro_batch_size=1, max_tokens=12)
    for entries in plan.per_worker:
        for i, w in entries:
            batch = plan.micro_batches[i]
            assert len(batch) * max(len(s.student) for s in batch) <= 12 or len(batch) == 1
    loads = [sum(len(s.student) for i, w in e if w for s in plan.micro_batches[i]) for e in plan.per_worker]
    assert abs(loads[0] - loads[1]) <= 7
    assert sorted(s.index for b in plan.micro_batches for s in b) == list(range(12))
    packed = plan_step(samples, 1, micro_batch_size=1, max_tokens=20, packing=True)
    assert all(sum(len(s.student) for s in b) <= 20 for b in packed.micro_batches)


@pytest.mark.parametrize("attention", ["packed_sdpa", "sdpa"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(attention, tiny_llama, chat_data, chatml_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdlib.models import packed_attention

    from kdlib.config import DataConfig, LossImplementation
    from kdlib.data.batching import collate
    from kdlib.data.encoding import ChatEncoder
    from kdlib.data.samples import build_samples
    from kdlib.losses import distillation_loss
    from kdlib.losses.registry import LOSSES
    from kdlib.models.forward import hidden_at_loss_positions
    from kdlib.models.head import lm_head_of

    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    samples, _ = build_samples(DataConfig(train=str(chat_data["train"])), "train", ChatEncoder(tokenizer))
    packed_attention.register()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attention)
    cfg = LOSSES.entry("kl").config_cls(name="kl", implementation=LossImplementation.naive)
    out = []
    for packing in (False, True):
        batch = collate(samples[:5], student_pad_id=tokenizer.pad_token_id, packing=packing).student
        assert batch.packed == packing
        model.zero_grad()
        hidden = hidden_at_loss_positions(model, batch)
        terms = distillation_loss(hidden, lm_head_of(model), None, None, batch.targets(), cfg,
                                  kd_weight=0.0, ce_weight=1.0, normaliser=float(batch.n_loss_tokens))
        terms.loss.backward()
        out.append((terms.loss.item(), model.model.layers[1].self_attn.q_proj.weight.grad.clone()))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-6)


def _one_fused_step(overrides: list[str]) -> tuple[dict, dict, dict, dict]:
    """One optimizer step of the fused loss on the first 8 training samples: (metrics, parameters
    before, gradients the optimizer stepped with, parameters after)."""
    from kdlib.runner import built

    cfg = kdlib.compose(overrides)
    with built(cfg, run_dir=None) as loop:
        worker = loop.pipeline.students.group.workers[0]
        params = dict(worker.objective.named_parameters())
        before = {n: p.detach().clone() for n, p in params.items()}
        grads: dict[str, torch.Tensor] = {}

        def record_gradients(optimizer, args, kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})

        worker.optimizer.register_step_pre_hook(record_gradients)
        metrics = loop.step(loop.pipeline.data.train[:8])
        after = {n: p.detach().clone() for n, p in params.items()}
    return metrics, before, grads, after


def test_fused_loss_accumulation_and_packing_give_the_same_update(tiny_overrides):
    """The fused KD + CE loss: one micro-batch of 8, 2 x 4 accumulated, and 2 x 4 packed give the
    same gradients and the same parameters after one step, to float32 round-off. (Teacher
    outputs travel in float32 here: bf16 on the wire rounds differently for other batch shapes.)"""
    common = tiny_overrides + ["train.global_batch_size=8", "loss.implementation=fused", "loss.chunk_size=16",
                               "transport.dtype=float32", "eval.before=false", "train.warmup_ratio=0"]
    variants = {
        "one micro-batch of 8": ["train.micro_batch_size=8"],
        "2 x 4 accumulated": ["train.micro_batch_size=4"],
        "2 x 4 packed": ["train.micro_batch_size=4", "train.packing=true"],
    }
    steps = {name: _one_fused_step(common + extra) for name, extra in variants.items()}
    metrics, before, grads, after = steps.pop("one micro-batch of 8")
    assert metrics["micro_batches"] == 1.0 and metrics["kd_loss"] > 0 and metrics["ce_loss"] > 0
    assert len(grads) == len(before) and all(float(g.abs().max()) > 0 for g in grads.values())
    lr = 1e-3  # tiny_overrides' train.lr, no warmup
    for name, (m, b, g, a) in steps.items():
        assert m["micro_batches"] == 2.0, name
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert m[key] == pytest.approx(metrics[key], rel=1e-5), (name, key)
        for param in before:
            assert torch.equal(b[param], before[param])  # the same starting point
            scale = float(grads[param].abs().max())
            assert float((g[param] - grads[param]).abs().max()) <= 1e-5 * scale, (name, param)
            # Adam's first step is lr * g / (|g| + eps): elements whose gradient is round-off-sized
            # may move by up to 2 * lr apart; every element with a real gradient lands in the same place
            real = grads[param].abs() > 1e-3 * scale
            torch.testing.assert_close(a[param][real], after[param][real], rtol=1e-6, atol=1e-7, msg=f"{name} {param}")
            assert float((a[param] - after[param]).abs().max()) <= 2 * lr * 1.01, (name, param)
            assert not torch.equal(after[param], before[param]), param  # the step did move it
