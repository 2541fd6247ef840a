"""The chunked-loss engine's term protocol, with terms that are not kdlib's own.

A teacher signal other than hidden states (here: top-k token ids and probabilities per row, the
shape an engine's top-k log-probabilities take) plugs in as a fast-path term; a term with its own
trainable parameter and a teacher side of arbitrary tensors plugs in as a general-path term. Both
must give the full-batch autograd values and gradients in float64 for any chunk size, and the
general path must compute the student's logits one chunk at a time.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pytest
import torch
import torch.nn.functional as F

import kdlib
from kdlib.losses import engine
from kdlib.losses.engine import AutogradTerm, LogitTerm, Plan, StudentRows, evaluate, even_chunks
from kdlib.models.head import LMHead

F64 = torch.float64


def student(n=11, h=6, v=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64).requires_grad_(True)
    head = LMHead(torch.randn(v, h, generator=g, dtype=F64).requires_grad_(True),
                  torch.randn(v, generator=g, dtype=F64).requires_grad_(True), logit_scale=1.3)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, head, targets, g


@dataclass(frozen=True)
class TopKCrossEntropy(LogitTerm):
    """-sum_k p_k log softmax(s)[id_k] against a teacher's top-k ids and probabilities."""

    teacher: Mapping[str, torch.Tensor]  # {"ids": [N, k], "probs": [N, k]}
    columns: int
    temperature: float
    value_scale: float

    def kd_values(self, s, teacher, ws, need_grad):
        ids, probs = teacher["ids"], teacher["probs"]
        log_q = torch.log_softmax(s, -1)
        values = -(probs * log_q.gather(-1, ids)).sum(-1)
        if need_grad:  # d/ds = (sum_k p_k) softmax(s) - p scattered at the ids
            s.copy_(log_q.exp_().mul_(probs.sum(-1, keepdim=True)).scatter_add_(-1, ids, -probs))
        return values


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_a_fast_path_term_reads_a_teacher_signal_other_than_hidden_states(chunk_size):
    hidden, head, targets, g = student()
    ids = torch.stack([torch.randperm(head.vocab_size, generator=g)[:3] for _ in range(hidden.shape[0])])
    probs = torch.softmax(torch.randn(hidden.shape[0], 3, generator=g, dtype=F64), -1) * 0.9
    term = TopKCrossEntropy({"ids": ids, "probs": probs}, columns=head.vocab_size, temperature=2.0, value_scale=4.0)
    plan = Plan(even_chunks(hidden.shape[0], chunk_size), head, term, targets, kd_weight=0.7, ce_weight=0.3)
    total, kd, ce = evaluate(plan, hidden, head.weight, head.bias)

    logits = head.logits(hidden)
    ref_kd = -(probs * torch.log_softmax(logits / 2.0, -1).gather(-1, ids)).sum() * 4.0
    ref_ce = F.cross_entropy(logits, targets, reduction="sum")
    ref = 0.7 * ref_kd + 0.3 * ref_ce
    torch.testing.assert_close((kd, ce, total), (ref_kd.detach(), ref_ce.detach(), ref.detach()), rtol=1e-12, atol=0)
    params = [hidden, head.weight, head.bias]
    for got, expected in zip(torch.autograd.grad(total, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@dataclass(frozen=True)
class ProjectedMatch(AutogradTerm):
    """sum over rows of |hidden @ P - teacher features|^2 + the student's log-probability of the
    teacher's chosen token: a parameter of its own, hidden rows and logits, arbitrary teacher rows."""

    teacher: Mapping[str, torch.Tensor]  # {"features": [N, d], "token": [N]}

    def kd_sum(self, chunk, student: StudentRows, teacher):
        (projection,) = student.extra
        match = (student.hidden @ projection - teacher["features"]).pow(2).sum()
        return match - torch.log_softmax(student.logits, -1).gather(-1, teacher["token"][:, None]).sum()


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_a_general_path_term_with_its_own_parameter(chunk_size, monkeypatch):
    hidden, head, targets, g = student(seed=1)
    n = hidden.shape[0]
    projection = torch.randn(hidden.shape[1], 4, generator=g, dtype=F64).requires_grad_(True)
    teacher = {"features": torch.randn(n, 4, generator=g, dtype=F64), "token": torch.randint(0, head.vocab_size, (n,))}
    rows_seen = []
    original = engine.head_logits

    def spy(head_, hidden_, dtype):
        rows_seen.append(hidden_.shape[0])
        return original(head_, hidden_, dtype)

    monkeypatch.setattr(engine, "head_logits", spy)
    plan = Plan(even_chunks(n, chunk_size), head, ProjectedMatch(teacher), targets, kd_weight=0.6, ce_weight=0.4)
    total, kd, ce = evaluate(plan, hidden, head.weight, head.bias, [projection])
    assert rows_seen and max(rows_seen) <= min(chunk_size, n)

    logits = head.logits(hidden)
    ref_kd = ((hidden @ projection - teacher["features"]).pow(2).sum()
              - torch.log_softmax(logits, -1).gather(-1, teacher["token"][:, None]).sum())
    ref = 0.6 * ref_kd + 0.4 * F.cross_entropy(logits, targets, reduction="sum")
    torch.testing.assert_close((kd, total), (ref_kd.detach(), ref.detach()), rtol=1e-12, atol=0)
    params = [hidden, head.weight, head.bias, projection]
    for got, expected in zip(torch.autograd.grad(total, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_only_the_engine_touches_private_torch_api_among_the_losses():
    root = Path(kdlib.__file__).parent
    users = set()
    for path in [*(root / "losses").glob("*.py"), *(root / "xtok").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch._"):
                users.add(path.name)
    assert users == {"engine.py"}
