"""The fused, chunked loss against the naive full-logit path: values and gradients.

The naive path (``implementation=naive``) materialises both models' logits and differentiates
the registered formulas with autograd; the fused path must give the same ``LossTerms`` and the
same gradients for the student hidden states, head weight and bias, for every registered loss
(a user loss registered here included), any chunk size, Vs != Vt, tied embeddings and bf16.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kdlib.config.schema import LossImplementation
from kdlib.losses import LOSSES, LossTerms, distillation_loss, fused_kd_loss, register_loss
from kdlib.losses.closed_form import CLOSED_FORM
from kdlib.losses.chunk_math import IGNORE_INDEX, Workspace as _Workspace
from kdlib.models.head import LMHead
from kdlib.registry import UnknownNameError

# bf16 tolerances (documented in docs/losses.md). Both paths round the logits to bf16 as the model
# does, then work in float32; the fused path accumulates the head gradient in float32 over chunks
# where the naive one rounds one bf16 matmul over the whole batch.
# - fused vs naive: values within 7e-4, gradients of the smooth divergences within 1.4e-2 (max
#   error / max |gradient|). Rank- and sign-based losses (hrl, tvd) have gradients that jump when
#   the two paths round a logit differently and swap two logits, so there only values are compared.
# - fused vs float64 on the same bf16-rounded logits (straight-through): the same logits, so the
#   same rank and sign decisions for every loss; observed values within 2e-7 and gradients within
#   9e-3, the rounding of the bf16 gradients themselves (2^-8 = 3.9e-3 per element).
BF16_VALUE_RTOL = 5e-3
BF16_GRAD_RTOL = 3e-2
BF16_ROUNDED_REFERENCE_VALUE_RTOL = 1e-6
BF16_ROUNDED_REFERENCE_GRAD_RTOL = 1.5e-2


@register_loss("unit_test_prob_l2")
def _user_prob_l2(student_logits, teacher_logits, *, scale: float = 1.0):
    """A user loss with a parameter: scale * sum_v (Q - P)^2, no closed form in kdlib."""
    q = torch.softmax(student_logits, -1)
    p = torch.softmax(teacher_logits, -1)
    return scale * (q - p).pow(2).sum(-1)


# (loss, params): every registered loss with non-default parameters where it has them.
CASES = [
    ("kl", {}),
    ("rkl", {}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skl", {"lam": 0.2}),
    ("srkl", {"lam": 0.2}),
    ("akl", {"alpha": 0.4}),
    ("tvd", {}),
    ("top1_ce", {"weight_by_teacher": True}),
    ("hrl", {"topk": 4, "margin": 0.1}),
    ("unit_test_prob_l2", {"scale": 3.0}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in CASES]


@dataclasses.dataclass
class Inputs:
    student_hidden: torch.Tensor
    student_head: LMHead
    teacher_hidden: torch.Tensor
    teacher_head: LMHead
    targets: torch.Tensor


def make_inputs(n=20, hs=12, ht=10, vs=48, vt=48, *, dtype=torch.float32, bias=True, seed=0,
                student_softcap=None, student_scale=1.0, teacher_softcap=None, teacher_scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    student = LMHead(
        weight=rand(vs, hs, scale=0.6).requires_grad_(True),
        bias=rand(vs, scale=0.5).requires_grad_(True) if bias else None,
        logit_scale=student_scale,
        softcap=student_softcap,
    )
    teacher = LMHead(
        weight=rand(vt, ht, scale=0.6), bias=rand(vt, scale=0.5) if bias else None,
        logit_scale=teacher_scale, softcap=teacher_softcap,
    )
    return Inputs(
        student_hidden=rand(n, hs).requires_grad_(True),
        student_head=student,
        teacher_hidden=rand(n, ht),
        teacher_head=teacher,
        targets=torch.randint(0, vs, (n,), generator=g),
    )


def make_cfg(name, implementation, **fields):
    return LOSSES.entry(name).config_cls(implementation=LossImplementation(implementation), **fields)


def run(inp: Inputs, cfg, *, teacher=True, targets=True, kd_weight=0.7, ce_weight=0.3,
        normaliser=5.0):
    terms = distillation_loss(
        inp.student_hidden, inp.student_head,
        inp.teacher_hidden if teacher else None, inp.teacher_head if teacher else None,
        inp.targets if targets else None, cfg,
        kd_weight=kd_weight, ce_weight=ce_weight, normaliser=normaliser,
    )
    params = [inp.student_hidden, inp.student_head.weight]
    if inp.student_head.bias is not None:
        params.append(inp.student_head.bias)
    grads = torch.autograd.grad(terms.loss, params) if terms.loss.requires_grad else None
    return terms, grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_same(fused, naive, *, value_rtol=1e-5, grad_rtol=1e-5):
    (tf, gf), (tn, gn) = fused, naive
    assert isinstance(tf, LossTerms) and tf.n_tokens == tn.n_tokens
    for a, b in [(tf.loss, tn.loss), (tf.kd_sum, tn.kd_sum), (tf.ce_sum, tn.ce_sum)]:
        assert a.dtype == b.dtype
        assert rel_err(a, b) < value_rtol, (a, b)
    assert not tf.kd_sum.requires_grad and not tf.ce_sum.requires_grad
    assert (gf is None) == (gn is None)
    for a, b in zip(gf or [], gn or []):
        assert a.dtype == b.dtype and a.shape == b.shape
        if grad_rtol is not None:  # None: values only (see the bf16 note above)
            assert rel_err(a, b) < grad_rtol


def both(inp, name, params, **kwargs):
    fields = dict(temperature=2.0, scale_by_temperature_squared=True, chunk_size=7)
    fields.update(kwargs.pop("fields", {}))
    naive = run(inp, make_cfg(name, "naive", **fields, **params), **kwargs)
    fused = run(inp, make_cfg(name, "fused", **fields, **params), **kwargs)
    return fused, naive


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_fused_matches_naive_for_every_loss(name, params):
    inp = make_inputs(student_softcap=6.0, student_scale=1.3, teacher_scale=0.8)
    fused, naive = both(inp, name, params)
    assert_same(fused, naive)
    assert float(fused[0].kd_sum) != 0 and float(fused[0].ce_sum) != 0


def test_every_builtin_loss_is_covered():
    builtins = {n for n in LOSSES.names() if LOSSES.get(n).__module__ == "kdlib.losses.divergences"}
    assert builtins <= {name for name, _ in CASES}
    assert "unit_test_prob_l2" in {name for name, _ in CASES}  # and a user-registered one


def test_builtins_have_closed_form_kernels():
    closed = {name for name in LOSSES.names() if LOSSES.get(name) in CLOSED_FORM}
    assert closed == {"kl", "rkl", "jsd", "skl", "srkl", "akl", "tvd", "top1_ce"}  # hrl: autograd


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_closed_form_gradients_match_autograd(name, params):
    inp = make_inputs(n=9, vs=30, vt=30, dtype=torch.float64, seed=1)
    h, w = inp.student_hidden, inp.student_head.weight
    th, tw = inp.teacher_hidden, inp.teacher_head.weight
    out = []
    for closed_form in (True, False):
        total = fused_kd_loss(h, w, th, tw, loss=name, chunk_size=4, temperature=0.5,
                              closed_form=closed_form, **params)
        out.append((total.detach(), torch.autograd.grad(total, [h, w])))
    (v1, g1), (v2, g2) = out
    assert rel_err(v1, v2) < 1e-12
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("name,params", [c for c in CASES if c[0] != "akl"],
                         ids=[i for i, c in zip(CASE_IDS, CASES) if c[0] != "akl"])
def test_gradcheck_float64(name, params):
    # AKL is left out: its head/tail weights are constants for autograd by design.
    inp = make_inputs(n=5, hs=4, ht=3, vs=9, vt=7, dtype=torch.float64, seed=2)
    bias = inp.student_head.bias

    def f(h, w, b):
        return fused_kd_loss(
            h, w, inp.teacher_hidden, inp.teacher_head.weight, loss=name, chunk_size=2,
            temperature=1.5, targets=inp.targets, ce_weight=0.5, student_bias=b,
            teacher_bias=inp.teacher_head.bias, student_softcap=4.0, student_logit_scale=1.2,
            **params,
        )

    assert torch.autograd.gradcheck(f, (inp.student_hidden, inp.student_head.weight, bias))


@pytest.mark.parametrize("vs,vt", [(48, 40), (40, 48)])
@pytest.mark.parametrize("name", ["jsd", "akl", "unit_test_prob_l2"])
def test_different_vocabulary_sizes(name, vs, vt):
    inp = make_inputs(vs=vs, vt=vt, seed=3)
    assert_same(*both(inp, name, {}))  # KD on the first min(Vs, Vt), CE on all Vs
    assert_same(*both(inp, name, {}, targets=False))
    assert_same(*both(inp, name, {}, ce_weight=0.0))  # CE reported, not differentiated


@pytest.mark.parametrize("chunk_size", [1, 7, 23])
def test_chunk_sizes_that_do_not_divide_the_tokens(chunk_size):
    inp = make_inputs(n=20, seed=4)
    assert_same(*both(inp, "kl", {}, fields={"chunk_size": chunk_size}))
    assert_same(*both(inp, "hrl", {}, fields={"chunk_size": chunk_size}))


def test_workspace_holds_one_chunk_of_logits(monkeypatch):
    """No buffer the loop allocates has more rows than the chunk, whatever N."""
    shapes = []
    original = _Workspace.get

    def recording_get(self, name, rows, cols):
        out = original(self, name, rows, cols)
        shapes.append((name, self._buffers[name].shape))
        return out

    monkeypatch.setattr(_Workspace, "get", recording_get)
    inp = make_inputs(n=50, vs=48, vt=40, seed=5)
    fused_kd_loss(inp.student_hidden, inp.student_head.weight, inp.teacher_hidden,
                  inp.teacher_head.weight, loss="jsd", chunk_size=8, targets=inp.targets).backward()
    buffers = dict(shapes)
    assert buffers and all(shape[0] == 8 and shape[1] <= 48 for shape in buffers.values())
    assert len(buffers) <= 6


def test_pure_kd_and_pure_ce():
    inp = make_inputs(seed=6)
    fused, naive = both(inp, "jsd", {}, targets=False)
    assert_same(fused, naive)
    assert float(fused[0].ce_sum) == 0.0
    fused, naive = both(inp, "jsd", {}, teacher=False)
    assert_same(fused, naive)
    assert float(fused[0].kd_sum) == 0.0


def test_zero_kd_weight_still_reports_kd():
    inp = make_inputs(seed=7)
    fused, naive = both(inp, "kl", {}, kd_weight=0.0, ce_weight=1.0)
    assert_same(fused, naive)
    assert float(fused[0].kd_sum) > 0
    pure_ce, _ = both(inp, "kl", {}, teacher=False, kd_weight=0.0, ce_weight=1.0)
    for a, b in zip(fused[1], pure_ce[1]):
        assert rel_err(a, b) < 1e-6


def test_ignored_targets():
    inp = make_inputs(seed=8)
    inp.targets[::3] = IGNORE_INDEX
    assert_same(*both(inp, "kl", {}))


def test_no_bias_no_softcap_temperature_one():
    inp = make_inputs(bias=False, seed=9)
    fields = {"temperature": 1.0, "scale_by_temperature_squared": False}
    assert_same(*both(inp, "rkl", {}, fields=fields))


def test_tied_embeddings():
    """The student head is the embedding matrix: its gradient collects both uses."""
    grads = {}
    for impl in ("naive", "fused"):
        torch.manual_seed(10)
        embed = torch.nn.Embedding(48, 12)
        mix = torch.nn.Linear(12, 12)
        ids = torch.randint(0, 48, (20,))
        hidden = torch.tanh(mix(embed(ids)))
        head = LMHead(weight=embed.weight)  # the same Parameter, as with tie_word_embeddings
        teacher = LMHead(weight=torch.randn(48, 10))
        cfg = make_cfg("jsd", impl, chunk_size=6)
        terms = distillation_loss(
            hidden, head, torch.randn(20, 10), teacher, ids.roll(-1), cfg,
            kd_weight=0.5, ce_weight=0.5, normaliser=20.0,
        )
        terms.loss.backward()
        grads[impl] = (embed.weight.grad.clone(), mix.weight.grad.clone())
    for a, b in zip(grads["fused"], grads["naive"]):
        assert rel_err(a, b) < 1e-5


def bf16_rounded_reference(inp: Inputs, name: str, *, temperature=2.0, kd_weight=0.7, ce_weight=0.3, normaliser=5.0):
    """The loss and its gradients in float64 from the logits the fused path sees: the bf16-rounded
    head products (rounding passed straight through for the gradient), plus the bias."""
    def logits(hidden, weight, bias):
        exact = hidden.double() @ weight.double().T
        return exact + (exact.to(torch.bfloat16).double() - exact).detach() + bias.double()

    h, w, b = (t.detach().double().requires_grad_(True)
               for t in (inp.student_hidden, inp.student_head.weight, inp.student_head.bias))
    student = logits(h, w, b)
    teacher = logits(inp.teacher_hidden, inp.teacher_head.weight, inp.teacher_head.bias)
    kd = LOSSES.get(name)(student / temperature, teacher / temperature) * temperature**2
    ce = F.cross_entropy(student, inp.targets, reduction="none")
    loss = (kd_weight * kd.sum() + ce_weight * ce.sum()) / normaliser
    return loss.detach(), torch.autograd.grad(loss, [h, w, b])


@pytest.mark.parametrize("name", ["kl", "rkl", "jsd", "akl", "hrl", "tvd"])
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_bfloat16_inputs(name, seed):
    inp = make_inputs(n=24, hs=16, ht=16, vs=64, vt=64, dtype=torch.bfloat16, seed=seed)
    fused, naive = both(inp, name, {}, fields={"chunk_size": 5})
    assert fused[0].loss.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in fused[1])
    reference_loss, reference_grads = bf16_rounded_reference(inp, name)
    assert rel_err(fused[0].loss, reference_loss) < BF16_ROUNDED_REFERENCE_VALUE_RTOL
    for got, expected in zip(fused[1], reference_grads, strict=True):
        assert rel_err(got, expected) < BF16_ROUNDED_REFERENCE_GRAD_RTOL
    smooth = name not in ("hrl", "tvd")
    assert_same(fused, naive, value_rtol=BF16_VALUE_RTOL, grad_rtol=BF16_GRAD_RTOL if smooth else None)


def test_backward_twice_with_retained_graph():
    inp = make_inputs(seed=12)
    h, w = inp.student_hidden, inp.student_head.weight
    loss = fused_kd_loss(h, w, inp.teacher_hidden, inp.teacher_head.weight, loss="jsd", chunk_size=6)
    first = torch.autograd.grad(3.0 * loss, [h, w], retain_graph=True)
    second = torch.autograd.grad(loss, [h, w])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, 3.0 * b)
    with pytest.raises(RuntimeError, match="already differentiated"):
        torch.autograd.grad(loss, [h, w])


def test_weight_gradient_is_adopted_without_a_copy(monkeypatch):
    import kdlib.losses.engine as fused_module

    pointers = []
    original = fused_module._run

    def recording_run(*args):
        out = original(*args)
        pointers.append(args[-1].params[0].data_ptr())  # the gradient buffers come last
        return out

    monkeypatch.setattr(fused_module, "_run", recording_run)
    inp = make_inputs(seed=13)
    w = inp.student_head.weight
    fused_kd_loss(inp.student_hidden, w, inp.teacher_hidden, inp.teacher_head.weight).backward()
    assert w.grad is not None and w.grad.data_ptr() == pointers[0]


def test_no_grad_gives_values_only():
    inp = make_inputs(seed=14)
    with torch.no_grad():
        out = fused_kd_loss(inp.student_hidden, inp.student_head.weight, inp.teacher_hidden,
                            inp.teacher_head.weight, loss="jsd", targets=inp.targets)
    assert not out.requires_grad
    expected = fused_kd_loss(inp.student_hidden, inp.student_head.weight, inp.teacher_hidden,
                             inp.teacher_head.weight, loss="jsd", targets=inp.targets)
    torch.testing.assert_close(out, expected.detach())


def test_frozen_head_gets_no_gradient():
    inp = make_inputs(seed=15)
    w = inp.student_head.weight.detach()
    h = inp.student_hidden
    out = fused_kd_loss(h, w, inp.teacher_hidden, inp.teacher_head.weight, loss="kl")
    (gh,) = torch.autograd.grad(out, [h])
    log_q = F.log_softmax(F.linear(h, w), -1)
    log_p = F.log_softmax(F.linear(inp.teacher_hidden, inp.teacher_head.weight), -1)
    (ref,) = torch.autograd.grad(F.kl_div(log_q, log_p, log_target=True, reduction="sum"), [h])
    assert rel_err(gh, ref) < 1e-5


def test_bad_inputs_fail_clearly():
    inp = make_inputs()
    h, w = inp.student_hidden, inp.student_head.weight
    th, tw = inp.teacher_hidden, inp.teacher_head.weight
    with pytest.raises(TypeError, match="beta"):
        fused_kd_loss(h, w, th, tw, loss="jsd", alpha=0.1)
    with pytest.raises(UnknownNameError, match="jsd"):
        fused_kd_loss(h, w, th, tw, loss="nope")
    with pytest.raises(ValueError, match="tokens"):
        fused_kd_loss(h, w, th[:-1], tw)
    with pytest.raises(ValueError, match="hidden size"):
        fused_kd_loss(h[:, :-1], w, th, tw)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_kd_loss(h, w, th, tw, chunk_size=0)
    with pytest.raises(ValueError, match="teacher_head"):
        fused_kd_loss(h, w, th, None)
