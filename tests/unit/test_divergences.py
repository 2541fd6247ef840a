"""Every built-in divergence against an independent float64 reference of its formula.

The references below are written from the definitions in docs/losses.md with numpy and plain
loops over tokens; they share no code with kdlib. Logits are random and non-zero, and the
temperature handling of ``kdlib.losses.get`` is checked at T = 0.5, 1 and 2.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlib.losses import LOSSES, get
from kdlib.losses.divergences import akl_head_fraction
from kdlib.registry import UnknownNameError

# ---------------------------------------------------------------------------------------------
# float64 references, one token at a time


def _softmax(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    out = np.zeros_like(x)
    e = np.exp(x[finite] - x[finite].max())
    out[finite] = e / e.sum()
    return out


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    total = 0.0
    for pi, qi in zip(p, q):
        if pi > 0:
            total += pi * (math.log(pi) - math.log(qi))
    return total


def ref_kl(s, t):
    return _kl(_softmax(t), _softmax(s))


def ref_rkl(s, t):
    return _kl(_softmax(s), _softmax(t))


def ref_jsd(s, t, beta=0.5):
    p, q = _softmax(t), _softmax(s)
    if beta == 0:
        return _kl(p, q)
    if beta == 1:
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def ref_skl(s, t, lam=0.1):
    p, q = _softmax(t), _softmax(s)
    return _kl(p, lam * p + (1 - lam) * q)


def ref_srkl(s, t, lam=0.1):
    p, q = _softmax(t), _softmax(s)
    return _kl(q, lam * q + (1 - lam) * p)


def _akl_weight(p, q, alpha):
    order = sorted(range(len(p)), key=lambda i: -p[i])
    head, cum = set(), 0.0
    for rank, i in enumerate(order):
        cum += p[i]
        if rank > 0 and cum > alpha:
            break
        head.add(i)
    g_head = sum(abs(p[i] - q[i]) for i in head)
    g_tail = sum(abs(p[i] - q[i]) for i in range(len(p)) if i not in head)
    return 0.5 if g_head + g_tail == 0 else g_head / (g_head + g_tail)


def ref_akl(s, t, alpha=0.5):
    p, q = _softmax(t), _softmax(s)
    w = _akl_weight(p, q, alpha)
    return w * _kl(p, q) + (1 - w) * _kl(q, p)


def ref_tvd(s, t):
    return 0.5 * float(np.abs(_softmax(t) - _softmax(s)).sum())


def ref_top1_ce(s, t, weight_by_teacher=False):
    i = int(np.argmax(t))
    loss = -math.log(_softmax(s)[i])
    return loss * _softmax(t)[i] if weight_by_teacher else loss


def ref_hrl(s, t, topk=5, margin=0.0):
    k = min(topk, len(t))
    top = [int(i) for i in np.argsort(-t, kind="stable")[:k]]
    order = 0.0
    for i in range(k):
        for j in range(i + 1, k):
            order += max(0.0, margin - (s[top[i]] - s[top[j]]))
    others = sorted((v for v in range(len(s)) if v not in top), key=lambda v: -s[v])[:k]
    floor = min(s[v] for v in top)
    rest = sum(max(0.0, margin - (floor - s[u])) for u in others)
    return order + rest


REFERENCES = {
    "kl": ref_kl,
    "rkl": ref_rkl,
    "jsd": ref_jsd,
    "skl": ref_skl,
    "srkl": ref_srkl,
    "akl": ref_akl,
    "tvd": ref_tvd,
    "top1_ce": ref_top1_ce,
    "hrl": ref_hrl,
}

# (loss, params) cases: the defaults and the interesting parameter values of each divergence.
CASES = [
    ("kl", {}),
    ("rkl", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 1.0}),
    ("skl", {}),
    ("skl", {"lam": 0.0}),
    ("skl", {"lam": 0.5}),
    ("srkl", {}),
    ("srkl", {"lam": 0.0}),
    ("srkl", {"lam": 0.5}),
    ("akl", {}),
    ("akl", {"alpha": 0.2}),
    ("akl", {"alpha": 0.9}),
    ("tvd", {}),
    ("top1_ce", {}),
    ("top1_ce", {"weight_by_teacher": True}),
    ("hrl", {}),
    ("hrl", {"topk": 1}),
    ("hrl", {"topk": 3, "margin": 0.5}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in CASES]
DIVERGENCES = ["kl", "rkl", "jsd", "skl", "srkl", "akl", "tvd", "hrl"]  # top1_ce is a CE


def _logits(n=6, v=33, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    return s, t


def _reference(name, s, t, params):
    fn = REFERENCES[name]
    return np.array([fn(si, ti, **params) for si, ti in zip(s.numpy(), t.numpy())])


def test_every_builtin_has_a_reference():
    assert set(REFERENCES) <= set(LOSSES.names())
    assert {name for name, _ in CASES} == set(REFERENCES)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_formula_matches_float64_reference(name, params):
    s, t = _logits(seed=1)
    out = LOSSES.get(name)(s, t, **params)
    assert out.shape == (s.shape[0],) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), _reference(name, s, t, params), rtol=1e-9, atol=1e-12)
    assert (out.abs() > 1e-6).all(), "random logits should give a non-trivial loss"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_public_loss_applies_temperature_in_float32(name, params, temperature):
    s, t = _logits(seed=2)
    loss = get(name)
    out = loss(s.float(), t.float(), temperature=temperature, **params)
    assert out.dtype == torch.float32
    expected = _reference(name, s / temperature, t / temperature, params)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=2e-5, atol=2e-6)
    scaled = loss(s.float(), t.float(), temperature=temperature, scale_by_temperature_squared=True,
                  **params)
    np.testing.assert_allclose(scaled.double().numpy(), expected * temperature**2, rtol=2e-5,
                               atol=2e-6)


def test_public_loss_uses_common_vocabulary():
    s, t = _logits(v=40, seed=3)
    out = get("jsd")(s.float(), t[:, :31].float())
    expected = _reference("jsd", s[:, :31], t[:, :31], {})
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_computed_in_float32(dtype):
    s, t = _logits(seed=4)
    out = get("kl")(s.to(dtype), t.to(dtype))
    assert out.dtype == torch.float32
    expected = _reference("kl", s.to(dtype).double(), t.to(dtype).double(), {})
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_padded_entries_are_masked_not_nan(name, params):
    s, t = _logits(seed=5)
    pad = torch.full((s.shape[0], 7), float("-inf"), dtype=torch.float64)
    s_pad = torch.cat([s[:, :10], pad[:, :3], s[:, 10:], pad[:, 3:]], dim=1).requires_grad_(True)
    t_pad = torch.cat([t[:, :10], pad[:, :3], t[:, 10:], pad[:, 3:]], dim=1)
    out = LOSSES.get(name)(s_pad, t_pad, **params)
    expected = _reference(name, s, t, params)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), s_pad)
    assert torch.isfinite(grad).all()
    assert (grad[:, 10:13] == 0).all() and (grad[:, -4:] == 0).all()


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_identical_distributions_give_zero_and_finite_gradients(name, temperature):
    _, t = _logits(seed=6)
    s = t.clone().float().requires_grad_(True)
    out = get(name)(s, t.float(), temperature=temperature, scale_by_temperature_squared=True)
    assert out.abs().max() < 1e-6
    (grad,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(grad).all()
    assert grad.abs().max() < 1e-5


def test_top1_ce_of_identical_distributions_is_minus_log_top_probability():
    _, t = _logits(seed=7)
    out = LOSSES.get("top1_ce")(t, t)
    expected = -torch.log_softmax(t, -1).max(-1).values
    torch.testing.assert_close(out, expected)


def _gradcheck_cases():
    # AKL treats its head/tail weights as constants (as the paper does), so its gradient is not
    # the derivative of its value; it is checked against its own formula below instead.
    return [(n, p) for n, p in CASES if n != "akl"]


@pytest.mark.parametrize(
    "name,params", _gradcheck_cases(), ids=[i for i, (n, _) in zip(CASE_IDS, CASES) if n != "akl"]
)
def test_gradients_are_derivatives_of_the_formula(name, params):
    s, t = _logits(n=3, v=9, seed=8)
    fn = LOSSES.get(name)
    assert torch.autograd.gradcheck(lambda x: fn(x, t, **params), (s.requires_grad_(True),))


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.9])
def test_akl_gradient_uses_constant_weights(alpha):
    s, t = _logits(seed=9)
    s.requires_grad_(True)
    out = LOSSES.get("akl")(s, t, alpha=alpha)
    (grad,) = torch.autograd.grad(out.sum(), s)
    for row, (si, ti) in enumerate(zip(s.detach().numpy(), t.numpy())):
        p, q = _softmax(ti), _softmax(si)
        w = _akl_weight(p, q, alpha)
        rkl = _kl(q, p)
        expected = w * (q - p) + (1 - w) * q * (np.log(q) - np.log(p) - rkl)
        np.testing.assert_allclose(grad[row].numpy(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_akl_head_weight_peaked_and_flat_rows(alpha):
    # 200 entries: peaked rows find their head among the top 64, flat rows need the full sort.
    g = torch.Generator().manual_seed(10)
    scales = torch.tensor([6.0, 0.05, 3.0, 0.2, 8.0, 0.01], dtype=torch.float64).unsqueeze(-1)
    p = torch.softmax(torch.randn(6, 200, generator=g, dtype=torch.float64) * scales, -1)
    q = torch.softmax(torch.randn(6, 200, generator=g, dtype=torch.float64), -1)
    expected = [_akl_weight(pi, qi, alpha) for pi, qi in zip(p.numpy(), q.numpy())]
    for sort_rows in (16, 2):  # the flat rows sorted together, or two at a time
        w = akl_head_fraction(p, (p - q).abs(), alpha, sort_rows=sort_rows)
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-9)


def test_hrl_is_zero_when_the_student_keeps_the_order_with_margins():
    _, t = _logits(seed=11)
    # Doubling the logits keeps the order and doubles every gap.
    assert LOSSES.get("hrl")(2 * t, t, topk=5).abs().max() == 0
    gaps = t.sort(-1, descending=True).values.diff(dim=-1).abs()
    margin = float(gaps[:, :6].min())  # the smallest gap among the top 6 of any row
    assert LOSSES.get("hrl")(3 * t, t, topk=5, margin=margin).abs().max() == 0
    # Swapping the teacher's top two tokens in the student is penalised by their gap.
    s = t.clone()
    top2 = t.topk(2, -1).indices
    rows = torch.arange(t.shape[0])
    s[rows, top2[:, 0]], s[rows, top2[:, 1]] = t[rows, top2[:, 1]], t[rows, top2[:, 0]]
    out = LOSSES.get("hrl")(s, t, topk=5)
    torch.testing.assert_close(out, t[rows, top2[:, 0]] - t[rows, top2[:, 1]])


def test_parameters_out_of_range_fail_clearly():
    s, t = _logits()
    with pytest.raises(ValueError, match="beta"):
        LOSSES.get("jsd")(s, t, beta=1.5)
    with pytest.raises(ValueError, match="lam"):
        LOSSES.get("skl")(s, t, lam=-0.1)
    with pytest.raises(ValueError, match="topk"):
        LOSSES.get("hrl")(s, t, topk=0)


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="jsd"):
        get("no_such_loss")


def test_builtin_parameters_and_defaults():
    assert LOSSES.entry("jsd").config_cls().beta == 0.5
    assert LOSSES.entry("skl").config_cls().lam == 0.1
    assert LOSSES.entry("srkl").config_cls().lam == 0.1
    assert LOSSES.entry("akl").config_cls().alpha == 0.5
    assert LOSSES.entry("hrl").config_cls().topk == 5
    assert LOSSES.entry("top1_ce").config_cls().weight_by_teacher is False
