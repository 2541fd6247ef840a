"""Batches: every sample used once per epoch, shares balanced, teacher work balanced by tokens,
and the objective independent of how a global batch is split into micro-batches."""

from __future__ import annotations

import pytest
import torch

import kdlib
from kdlib.controller.dispatch import assign_by_tokens
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
    """Same global batch, micro-batches of 8 vs 3: identical loss and identical updated weights."""
    from kdlib.pipeline import Pipeline

    results, weights = [], []
    for micro in (8, 3):
        cfg = kdlib.compose(tiny_overrides + ["train.global_batch_size=8", f"train.micro_batch_size={micro}", "loss.implementation=naive", "eval.before=false"])
        with Pipeline.from_config(cfg, run_dir=None) as pipeline:
            from kdlib.controller.offpolicy import OffPolicyLoop

            loop = OffPolicyLoop(pipeline)
            results.append(loop.train_step(pipeline.data.train[:8]))
            weights.append(pipeline.student.workers[0].model.model.layers[0].mlp.up_proj.weight.detach().clone())
    for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-5), key
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-7)
