"""Closed-form value and gradient kernels of the built-in divergences, for the fused loss.

The fused path (``kdlib.losses.fused``) needs, per chunk of tokens, each divergence's values and its
gradient with respect to the student logits. Autograd on the formula gives both for any registered
loss; for the built-ins this module computes them in place in reused buffers, several times faster
on CPU at 150k-entry rows, where every pass over a chunk is bound by memory traffic.

A kernel ``(s, t, ws, need_grad, **params) -> values [rows]`` receives the tempered student
logits s and the teacher's log-probabilities t [rows, V] of one chunk (float32; float64 for
float64 inputs), which it may overwrite; their rows are contiguous, s may have a row stride
larger than V. The caller normalised the teacher (:func:`kdlib.losses.chunk_math.log_probs_` on
logits recomputed from hidden states, or a top-k signal that covers the vocabulary); every kernel
takes P = exp(t), so both give the same bits. ``ws.get(name, rows, cols)`` lends scratch buffers
that are reused by every chunk. With ``need_grad`` the kernel leaves d(sum of values)/ds in s.
Logits here come from matrix products, so they are finite: no -inf handling.
tests/unit/test_fused_loss.py checks every kernel against autograd on its formula in
``kdlib.losses.divergences``.
"""

from __future__ import annotations

from typing import Callable

import torch

from kdlib.losses.divergences import (
    check_unit_interval,
    adaptive_kl,
    akl_head_fraction,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skewed_kl,
    skewed_reverse_kl,
    top1_cross_entropy,
    total_variation,
)

CLOSED_FORM: dict[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] = {}

_TINY = torch.finfo(torch.float32).tiny


def closed_form(formula: Callable[..., torch.Tensor]):
    """Register the decorated kernel as the closed-form value and gradient of ``formula``."""

    def decorate(kernel):
        CLOSED_FORM[formula] = kernel
        return kernel

    return decorate


def _log_softmax_(x: torch.Tensor, probs: torch.Tensor) -> None:
    """x <- log_softmax(x) in place, probs <- softmax(x); one exp (the student's side)."""
    x.sub_(x.amax(-1, keepdim=True))
    torch.exp(x, out=probs)
    norm = probs.sum(-1, keepdim=True)
    probs.mul_(norm.reciprocal())
    x.sub_(norm.log_())


def _teacher_probs(t: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """probs <- P = exp(t) from the teacher's log-probabilities (the teacher's side)."""
    return torch.exp(t, out=probs)


# Row sums below are always ``torch.sum`` of an in-place product: its pairwise summation keeps
# the float32 error of a 150k-term sum near 1e-7, where a BLAS dot product (bmm) drifts to 1e-5.


def _project_(g: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """g <- q * (g - <q, g>): the softmax Jacobian applied to g = dL/dq. Returns <q, g>."""
    g.mul_(q)
    inner = g.sum(-1, keepdim=True)
    g.addcmul_(q, inner, value=-1.0)
    return inner.squeeze(-1)


@closed_form(forward_kl)
def _kl_kernel(s, t, ws, need_grad):
    q = ws.get("q", *s.shape)
    p = ws.get("p", *s.shape)
    _log_softmax_(s, q)
    _teacher_probs(t, p)
    values = t.sub_(s).mul_(p).sum(-1)  # sum p (log p - log q)
    if need_grad:
        torch.sub(q, p, out=s)
    return values


@closed_form(reverse_kl)
def _rkl_kernel(s, t, ws, need_grad):
    q = ws.get("q", *s.shape)
    _log_softmax_(s, q)
    s.sub_(t)  # log q - log p
    if need_grad:  # q * (log q - log p - KL); the inner product is the value itself
        return _project_(s, q)
    return s.mul_(q).sum(-1)


def _log_mixture_into(m, a, b, weight):
    """m <- log(weight * a + (1 - weight) * b), floored at the smallest normal float."""
    return torch.lerp(b, a, weight, out=m).clamp_min_(_TINY).log_()


@closed_form(generalized_jsd)
def _jsd_kernel(s, t, ws, need_grad, beta=0.5):
    check_unit_interval("jsd beta", beta)
    if beta == 0.0:
        return _kl_kernel(s, t, ws, need_grad)
    if beta == 1.0:
        return _rkl_kernel(s, t, ws, need_grad)
    q = ws.get("q", *s.shape)
    p = ws.get("p", *s.shape)
    _log_softmax_(s, q)
    _teacher_probs(t, p)
    log_m = _log_mixture_into(ws.get("m", *s.shape), p, q, beta)
    kl_p = t.sub_(log_m).mul_(p).sum(-1)
    s.sub_(log_m)  # log q - log m
    if need_grad:  # (1 - beta) * q * (log q - log m - KL(Q || M))
        kl_q = _project_(s, q)
        s.mul_(1.0 - beta)
    else:
        kl_q = s.mul_(q).sum(-1)
    return beta * kl_p + (1.0 - beta) * kl_q


@closed_form(skewed_kl)
def _skl_kernel(s, t, ws, need_grad, lam=0.1):
    check_unit_interval("skl lam", lam)
    if lam == 0.0:
        return _kl_kernel(s, t, ws, need_grad)
    q = ws.get("q", *s.shape)
    p = ws.get("p", *s.shape)
    m = ws.get("m", *s.shape)
    _log_softmax_(s, q)
    _teacher_probs(t, p)
    torch.lerp(q, p, lam, out=m).clamp_min_(_TINY)
    values = t.sub_(torch.log(m, out=s)).mul_(p).sum(-1)  # sum p (log p - log m)
    if need_grad:  # -(1 - lam) * q * (r - <q, r>), r = p / m
        torch.div(p, m, out=s)
        _project_(s, q)
        s.mul_(lam - 1.0)
    return values


@closed_form(skewed_reverse_kl)
def _srkl_kernel(s, t, ws, need_grad, lam=0.1):
    check_unit_interval("srkl lam", lam)
    if lam == 0.0:
        return _rkl_kernel(s, t, ws, need_grad)
    q = ws.get("q", *s.shape)
    p = ws.get("p", *s.shape)
    m = ws.get("m", *s.shape)
    _log_softmax_(s, q)
    _teacher_probs(t, p)
    torch.lerp(p, q, lam, out=m).clamp_min_(_TINY)
    s.sub_(torch.log(m, out=t))  # log q - log m
    values = torch.mul(s, q, out=p).sum(-1)
    if need_grad:  # q * (g - <q, g>), g = log q - log m - lam * q / m
        s.sub_(torch.div(q, m, out=t), alpha=lam)
        _project_(s, q)
    return values


@closed_form(total_variation)
def _tvd_kernel(s, t, ws, need_grad):
    q = ws.get("q", *s.shape)
    diff = ws.get("p", *s.shape)
    _log_softmax_(s, q)
    _teacher_probs(t, diff)
    torch.sub(q, diff, out=diff)  # q - p
    if need_grad:  # q * (g - <q, g>), g = sign(q - p) / 2
        torch.sign(diff, out=s)
        _project_(s, q)
        s.mul_(0.5)
    return 0.5 * diff.abs_().sum(-1)


@closed_form(adaptive_kl)
def _akl_kernel(s, t, ws, need_grad, alpha=0.5):
    check_unit_interval("akl alpha", alpha)
    q = ws.get("q", *s.shape)
    p = ws.get("p", *s.shape)
    d = ws.get("m", *s.shape)
    _log_softmax_(s, q)
    _teacher_probs(t, p)
    w = akl_head_fraction(p, torch.sub(p, q, out=d).abs_(), alpha)
    torch.sub(t, s, out=d)  # log p - log q
    fkl = torch.mul(p, d, out=t).sum(-1)
    rkl = -torch.mul(q, d, out=t).sum(-1)
    if need_grad:  # w (q - p) + (1 - w) q (log q - log p - RKL)
        d.add_(rkl.unsqueeze(-1)).mul_(q).mul_((w - 1.0).unsqueeze(-1))
        torch.sub(q, p, out=s).mul_(w.unsqueeze(-1)).add_(d)
    return w * fkl + (1.0 - w) * rkl


@closed_form(top1_cross_entropy)
def _top1_ce_kernel(s, t, ws, need_grad, weight_by_teacher=False):
    index = t.argmax(-1, keepdim=True)
    q = ws.get("q", *s.shape)
    _log_softmax_(s, q)
    values = -s.gather(-1, index).squeeze(-1)
    scale = None
    if weight_by_teacher:  # max p = 1 / sum exp(t - max t)
        t.sub_(t.gather(-1, index)).exp_()
        scale = t.sum(-1).reciprocal_()
        values = values * scale
    if need_grad:  # scale * (q - onehot)
        s.copy_(q).scatter_add_(-1, index, torch.full_like(values, -1.0).unsqueeze(-1))
        if scale is not None:
            s.mul_(scale.unsqueeze(-1))
    return values
