"""What a divergence becomes when the teacher sends a top-k or a sample instead of its distribution.

The built-in divergences are defined on two whole distributions (:mod:`kdlib.losses.divergences`).
A sparse teacher signal knows the teacher's distribution P only at a few tokens per position, so
each signal has an estimator of the divergence; this module holds them as pure reference formulas
on full student logits (the naive path, and what the chunked kernels of
:mod:`kdlib.losses.sparse` are tested against in float64). Q is the student's distribution,
p and q their probabilities, a = log p and b = log q.

**Top-k (buckets).** With T the teacher's k tokens, both distributions are collapsed onto k + 1
outcomes, the k tokens and "any other token" R: ``Q_b = (q_T, q_R)`` with q_R = sum of q outside
T, and ``P_b = (p_T, p_R)`` with the tail mass the teacher sent, or without it the truncated
teacher ``(p_T / P_T, 0)``. The estimate is the registered divergence of the buckets,
``D(P_b || Q_b)``. For a divergence that is a sum over tokens of h(p, q) with h(0, q) linear in q
(every f-divergence: kl, rkl, jsd, skl, srkl, tvd) the truncated form equals D on the whole
vocabulary between the renormalised top-k teacher and the student, and the tail form equals D
between the student and the teacher completed outside T in proportion to the student (the tail
bucket of the literature). Neither is unbiased; the tail form is exact on the k + 1 buckets.

**Sampled (importance sampling, RS-KD).** For a divergence that is a sum over tokens,
``D = sum_v p_v phi(a_v, b_v)`` with phi its *integrand* (:data:`INTEGRANDS`), k draws x_j from a
proposal r give ``D_hat = (1/k) sum_j (p / r)(x_j) phi(a(x_j), b(x_j))``, whose expectation is D
and whose gradient's expectation is D's gradient (the estimate is linear in the draws). With r =
P (the default) every weight p/r is 1 and the forward-KL estimate is RS-KD's.

**Rank losses on top-k.** ``top1_ce`` and ``hrl`` read only the teacher's order among its most
probable tokens (and top1_ce's weight, p of the first): with k at least as many tokens as they
rank (:data:`RANKED`) the top-k signal determines them exactly. They are evaluated on the dense
teacher that keeps the top k and spreads the rest of the mass evenly, which has the same order and
the same first probability.

Other losses (akl, whose weights need the whole distribution; a user's loss without an integrand)
work on the hidden-state signal only; :func:`signal_support` says which.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kdlib.losses.divergences import check_unit_interval
from kdlib.losses.registry import LOSSES

# phi(a, b, **params): the integrand under the teacher of a divergence that sums over tokens,
# D(P || Q) = sum_v p_v phi(log p_v, log q_v). Registered by loss name.
INTEGRANDS: dict[str, Callable[..., torch.Tensor]] = {}
# loss name -> the number of the teacher's top tokens it reads, from its parameters.
RANKED: dict[str, Callable[..., int]] = {
    "top1_ce": lambda **params: 1,
    "hrl": lambda topk=5, **params: int(topk),
}


def register_integrand(name: str):
    """Decorator: ``phi(a, b, **params)`` is the integrand of the registered loss ``name``, which
    then works on the ``topk`` and ``sampled`` signals (a user's divergence too)."""

    def decorate(fn):
        INTEGRANDS[name] = fn
        return fn

    return decorate


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """q / p at the teacher's tokens (p > 0 there: they were drawn from it or are its top k)."""
    return torch.exp(b - a)


def _log_mix(x: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * e^x + (1 - weight) * e^y) for 0 < weight < 1."""
    return torch.logaddexp(x + math.log(weight), y + math.log1p(-weight))


@register_integrand("kl")
def _kl(a, b):
    return a - b


@register_integrand("rkl")
def _rkl(a, b):
    return _ratio(a, b) * (b - a)


@register_integrand("jsd")
def _jsd(a, b, beta: float = 0.5):
    check_unit_interval("jsd beta", beta)
    if beta == 0.0:
        return _kl(a, b)
    if beta == 1.0:
        return _rkl(a, b)
    m = _log_mix(a, b, beta)
    return beta * (a - m) + (1.0 - beta) * _ratio(a, b) * (b - m)


@register_integrand("skl")
def _skl(a, b, lam: float = 0.1):
    check_unit_interval("skl lam", lam)
    if lam == 1.0:
        return torch.zeros_like(a + b)
    return a - (b if lam == 0.0 else _log_mix(a, b, lam))


@register_integrand("srkl")
def _srkl(a, b, lam: float = 0.1):
    check_unit_interval("srkl lam", lam)
    if lam == 1.0:
        return torch.zeros_like(a + b)
    return _ratio(a, b) * (b - (a if lam == 0.0 else _log_mix(b, a, lam)))


@register_integrand("tvd")
def _tvd(a, b):
    return 0.5 * (1.0 - _ratio(a, b)).abs()


def signal_support(loss: str, signal: str, params: dict, k: int) -> Optional[str]:
    """Why ``loss`` (with ``params``) cannot run on ``signal`` with ``k`` tokens per position,
    in a few words; None when it can."""
    if signal == "hidden":
        return None
    if loss in INTEGRANDS:
        return None
    if signal == "topk" and loss in RANKED:
        need = RANKED[loss](**params)
        return None if k >= need else f"it ranks the teacher's top {need} tokens; teacher.signal.k={k} is fewer"
    if loss in RANKED:
        return "it reads the teacher's most probable tokens, which draws do not give"
    if loss == "akl":
        return "its weights need the teacher's whole distribution (its head and tail)"
    return ("it is not a sum over tokens; register its integrand with "
            "kdlib.losses.estimators.register_integrand to use it on sparse signals")


# ----------------------------------------------------------------------------------------------
# Reference estimates on full student logits [N, V] (autograd gives their gradients)


def bucket_log_probs(
    student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P_b, log Q_b) [N, k + 1]: the top-k buckets and the rest (see the module docstring).
    Without ``tail`` the teacher's top k are renormalised and its rest bucket is empty (-inf)."""
    ids = ids.long()
    lq = F.log_softmax(student_logits, -1)
    outside = torch.ones_like(lq, dtype=torch.bool).scatter_(-1, ids, False)
    lq_rest = torch.logsumexp(lq.masked_fill(~outside, float("-inf")), -1, keepdim=True)
    lq_b = torch.cat([lq.gather(-1, ids), lq_rest], -1)
    lp = logprobs.to(lq.dtype)
    if tail is None:
        lp_b = torch.cat([lp - torch.logsumexp(lp, -1, keepdim=True), torch.full_like(lq_rest, float("-inf"))], -1)
    else:
        lp_b = torch.cat([lp, tail.to(lq.dtype).unsqueeze(-1)], -1)
    return lp_b, lq_b


def topk_estimate(loss: str, student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                  tail: Optional[torch.Tensor], **params) -> torch.Tensor:
    """Per-row estimate [N] of ``loss`` from a top-k signal: the buckets' divergence for a loss
    with an integrand, the ranks' loss for a ranked one."""
    if loss in RANKED and loss not in INTEGRANDS:
        return LOSSES.get(loss)(student_logits, ranked_teacher(logprobs, ids, student_logits.shape[-1], tail), **params)
    lp_b, lq_b = bucket_log_probs(student_logits, ids, logprobs, tail)
    if ids.shape[-1] == student_logits.shape[-1]:  # the top k are the whole vocabulary: no rest
        lp_b, lq_b = lp_b[:, :-1], lq_b[:, :-1]
    return LOSSES.get(loss)(lq_b, lp_b, **params)


def ranked_teacher(logprobs: torch.Tensor, ids: torch.Tensor, vocab: int,
                   tail: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense teacher log-probabilities [N, vocab]: the top k as sent, the rest of the mass spread
    evenly over the other tokens (each of those at most p_k, so the order of the top k is kept)."""
    lp = logprobs.float() if logprobs.dtype not in (torch.float32, torch.float64) else logprobs
    k = ids.shape[-1]
    rest = tail if tail is not None else torch.log1p(-lp.exp().sum(-1).clamp(max=1.0))
    fill = (rest.to(lp.dtype) - math.log(max(vocab - k, 1))).unsqueeze(-1)
    return fill.expand(lp.shape[0], vocab).clone().scatter_(-1, ids.long(), lp)


def sampled_weights(logprobs: torch.Tensor, proposal: Optional[torch.Tensor]) -> torch.Tensor:
    """Importance weights [N, k] of k draws: (p / r)(x_j) / k, 1/k when the proposal r is P."""
    k = logprobs.shape[-1]
    if proposal is None:
        return torch.full_like(logprobs, 1.0 / k)
    return torch.exp(logprobs - proposal) / k


def sampled_estimate(loss: str, student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                     proposal: Optional[torch.Tensor], **params) -> torch.Tensor:
    """Per-row unbiased estimate [N] of ``loss`` from k draws: sum_j w_j phi(a_j, b_j)."""
    lq = F.log_softmax(student_logits, -1).gather(-1, ids.long())
    lp = logprobs.to(lq.dtype)
    weights = sampled_weights(lp, None if proposal is None else proposal.to(lq.dtype))
    return (weights * INTEGRANDS[loss](lp, lq, **params)).sum(-1)
