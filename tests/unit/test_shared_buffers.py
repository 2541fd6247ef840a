"""Loss evaluations sharing one head gradient and one workspace (kdlib.losses.shared_buffers).

The parts of a mixed micro-batch are evaluated one after the other on their own rows of the same
student forward, each against its own teacher. Shared, they must give, in float64, the gradients of
the same evaluations apart (the head's gradient allocated once instead of once per part), also over
two backward passes of a kept graph; a loss that weighs the parts differently cannot be served
by one buffer and must stop with an error rather than train on a wrong gradient.
"""

from __future__ import annotations

import pytest
import torch

from kdlib.config.schema import LossImplementation
from kdlib.losses import LOSSES, distillation_loss
from kdlib.losses.chunk_math import Workspace
from kdlib.losses.shared_buffers import sharing
from kdlib.models.head import LMHead

F64 = torch.float64
ROWS = (slice(0, 7), slice(7, 19), slice(19, 23))  # three parts, the middle one longer than a chunk


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, h, v = ROWS[-1].stop, 6, 20
    hidden = torch.randn(n, h, generator=g, dtype=F64).requires_grad_(True)
    head = LMHead(torch.randn(v, h, generator=g, dtype=F64).requires_grad_(True),
                  torch.randn(v, generator=g, dtype=F64).requires_grad_(True), logit_scale=1.3)
    targets = torch.randint(0, v, (n,), generator=g)
    # each part its own teacher (own head and hidden states), as the parts of a mixed micro-batch
    teachers = [(torch.randn(r.stop - r.start, 5, generator=g, dtype=F64),
                 LMHead(torch.randn(v, 5, generator=g, dtype=F64), None)) for r in ROWS]
    return hidden, head, targets, teachers


def _parts(hidden, head, targets, teachers, scales=(1.0, 1.0, 1.0)):
    cfg = LOSSES.entry("skl").config_cls(implementation=LossImplementation.fused, chunk_size=8, temperature=2.0)
    return [
        scale * distillation_loss(hidden[rows], head, t_hidden, t_head, targets[rows], cfg,
                                  kd_weight=0.6, ce_weight=0.4, normaliser=float(targets.numel())).loss
        for rows, (t_hidden, t_head), scale in zip(ROWS, teachers, scales)
    ]


def _grads(hidden, head):
    out = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    return out


def test_shared_evaluations_give_the_gradients_of_separate_ones_in_float64():
    hidden, head, targets, teachers = _setup()
    apart = _parts(hidden, head, targets, teachers)
    sum(apart).backward()
    expected = _grads(hidden, head)

    with sharing() as shared:
        together = _parts(hidden, head, targets, teachers)
    (weight_grad,) = [g for g in shared._gradients.values() if g.param is head.weight]
    assert weight_grad.members == len(ROWS)  # one [V, H] buffer for the three parts
    assert len(shared._workspaces) == 1
    buffer = weight_grad.buffer.data_ptr()
    sum(together).backward()
    assert head.weight.grad.data_ptr() == buffer  # adopted as .grad without a copy
    torch.testing.assert_close(torch.stack(together), torch.stack(apart).detach(), rtol=1e-13, atol=0)
    for got, want, name in zip(_grads(hidden, head), expected, ("hidden", "weight", "bias")):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15, msg=name)
    assert weight_grad.buffer is None  # handed over once


def test_a_kept_graph_gives_the_shared_gradient_on_every_backward_pass():
    hidden, head, targets, teachers = _setup(1)
    sum(_parts(hidden, head, targets, teachers)).backward()
    once = _grads(hidden, head)

    with sharing():
        total = sum(_parts(hidden, head, targets, teachers))
    total.backward(retain_graph=True)
    total.backward()
    for got, want in zip(_grads(hidden, head), once):
        torch.testing.assert_close(got, 2 * want, rtol=1e-12, atol=1e-15)


def test_parts_weighed_differently_stop_the_backward_pass():
    hidden, head, targets, teachers = _setup(2)
    with sharing():
        parts = _parts(hidden, head, targets, teachers, scales=(1.0, 2.0, 1.0))
    with pytest.raises(RuntimeError, match="same weight"):
        sum(parts).backward()


def test_a_non_finite_loss_gives_non_finite_gradients_for_the_bad_step_check_not_an_error():
    hidden, head, targets, teachers = _setup(4)
    with sharing():
        parts = _parts(hidden, head, targets, teachers)
    (sum(parts) * float("nan")).backward()
    assert head.weight.grad.isnan().all() and hidden.grad.isnan().all()


def test_outside_a_sharing_block_each_evaluation_keeps_its_own_gradient():
    hidden, head, targets, teachers = _setup(3)
    parts = _parts(hidden, head, targets, teachers, scales=(1.0, 2.0, 0.5))
    sum(parts).backward()
    weight = head.weight.grad.clone()
    head.weight.grad = None
    for scale, part in zip((1.0, 2.0, 0.5), _parts(hidden, head, targets, teachers)):
        (scale * part).backward()
    torch.testing.assert_close(weight, head.weight.grad, rtol=1e-12, atol=1e-15)


def test_a_workspace_grows_for_a_longer_chunk():
    ws = Workspace(4, torch.float32, torch.device("cpu"))
    assert ws.get("z", 3, 5).shape == (3, 5)
    assert ws.get("z", 9, 5).shape == (9, 5)
    assert ws.get("z", 2, 5).data_ptr() == ws.get("z", 9, 5).data_ptr()  # reused once grown
