"""Built-in per-token losses between a student and a teacher distribution.

Each function takes float32 logits that the caller already divided by the temperature (entries
outside the shared vocabulary may be -inf in both) and returns one value per token, [N]. They are
the reference formulas: the naive path and ``kdlib.losses.get`` call them directly, and the fused
path either differentiates them with autograd or uses a closed-form gradient that the tests check
against them. They are NaN-free, in value and gradient, when both distributions put zero mass on
the same entries, and every divergence is 0 (with finite gradients) for identical distributions.

Notation: P is the teacher distribution, Q the student's, KL(P || Q) = sum_v P log(P / Q).
Parameter conventions and their mapping to TRL and KDFlow are in ``docs/losses.md``.

For most built-ins, ``kdlib.losses.closed_form`` holds the closed-form value and gradient that the
fused path evaluates in place on chunks of logits instead of running autograd on the formula.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from kdlib.losses.registry import register_loss

_NEG_INF = float("-inf")


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(P || Q) from log-probabilities.

    Entries with P = 0 contribute exactly 0, to the value and to the gradient (they are filled
    before the product, so no 0 * inf ever reaches autograd). P > 0 where Q = 0 gives +inf.
    """
    p = log_p.exp()
    off = p == 0
    diff = log_p.masked_fill(off, 0.0) - log_q.masked_fill(off, 0.0)
    return (p * diff).sum(-1)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * A + (1 - weight) * B) from log-probabilities, for 0 < weight < 1.

    Entries where both are -inf stay -inf, with a zero (not NaN) gradient.
    """
    both = (log_a == _NEG_INF) & (log_b == _NEG_INF)
    la = log_a.masked_fill(both, 0.0) + math.log(weight)
    lb = log_b.masked_fill(both, 0.0) + math.log1p(-weight)
    return torch.logaddexp(la, lb).masked_fill(both, _NEG_INF)


def check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@register_loss("kl")
def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(P || Q): mean-seeking, the classic KD objective (Hinton et al.)."""
    return kl_from_log_probs(F.log_softmax(teacher_logits, -1), F.log_softmax(student_logits, -1))


@register_loss("rkl")
def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Reverse KL(Q || P): mode-seeking (MiniLLM)."""
    return kl_from_log_probs(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1))


@register_loss("jsd")
def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence with M = beta * P + (1 - beta) * Q.

    loss = beta * KL(P || M) + (1 - beta) * KL(Q || M): exactly TRL's GKD ``beta`` for
    0 < beta < 1 (beta = 0.5 is the symmetric JSD). At the end points the formula is identically
    0, so, like TRL, beta = 0 gives KL(P || Q) and beta = 1 gives KL(Q || P). KDFlow's
    ``jsd_beta`` weights the student instead: KDFlow ``jsd_beta = b`` is kdlib ``beta = 1 - b``.
    """
    check_unit_interval("jsd beta", beta)
    log_p = F.log_softmax(teacher_logits, -1)
    log_q = F.log_softmax(student_logits, -1)
    if beta == 0.0:
        return kl_from_log_probs(log_p, log_q)
    if beta == 1.0:
        return kl_from_log_probs(log_q, log_p)
    log_m = log_mixture(log_p, log_q, beta)
    return beta * kl_from_log_probs(log_p, log_m) + (1.0 - beta) * kl_from_log_probs(log_q, log_m)


@register_loss("skl")
def skewed_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, lam: float = 0.1
) -> torch.Tensor:
    """Skewed forward KL (DistiLLM, Ko et al. 2024): KL(P || lam * P + (1 - lam) * Q).

    ``lam`` is the skew (DistiLLM's alpha, KDFlow's ``skew_lambda``, same meaning): lam = 0 is
    forward KL; larger values bound the loss (it is at most -log(lam)) and smooth its gradient.
    """
    check_unit_interval("skl lam", lam)
    log_p = F.log_softmax(teacher_logits, -1)
    log_q = F.log_softmax(student_logits, -1)
    if lam == 0.0:
        return kl_from_log_probs(log_p, log_q)
    if lam == 1.0:
        return torch.zeros_like(log_p[..., 0])
    return kl_from_log_probs(log_p, log_mixture(log_p, log_q, lam))


@register_loss("srkl")
def skewed_reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, lam: float = 0.1
) -> torch.Tensor:
    """Skewed reverse KL (DistiLLM): KL(Q || lam * Q + (1 - lam) * P); lam = 0 is reverse KL."""
    check_unit_interval("srkl lam", lam)
    log_p = F.log_softmax(teacher_logits, -1)
    log_q = F.log_softmax(student_logits, -1)
    if lam == 0.0:
        return kl_from_log_probs(log_q, log_p)
    if lam == 1.0:
        return torch.zeros_like(log_q[..., 0])
    return kl_from_log_probs(log_q, log_mixture(log_q, log_p, lam))


def akl_head_fraction(
    p: torch.Tensor, gap: torch.Tensor, alpha: float, *, probe: int = 64, sort_rows: int = 16
) -> torch.Tensor:
    """AKL's weight of forward KL per row: g_head / (g_head + g_tail), 0.5 where both are 0.

    The head is the teacher's most probable tokens, in decreasing order of P, whose cumulative
    probability (that token included) is at most ``alpha``, and always the top-1 token; the tail
    is the rest. ``gap`` is |P - Q|. Sorting a 150k vocabulary is slow, so the teacher's
    ``probe`` most probable tokens are tried first: a row whose top-``probe`` mass exceeds
    ``alpha`` has its whole head among them; the other rows are sorted in full, ``sort_rows`` at
    a time to bound the memory of the sort. Tied probabilities are ordered as ``topk``/``sort``
    return them.
    """
    total = gap.sum(-1)
    vocab = p.shape[-1]
    k = min(probe, vocab)
    values, index = p.topk(k, dim=-1)
    head, cum_top = _head_gap(values, index, gap, alpha)
    if k < vocab:
        unresolved = (cum_top <= alpha).nonzero().squeeze(-1)
        for rows in unresolved.split(sort_rows):
            values, index = p.index_select(0, rows).sort(dim=-1, descending=True)
            head_rows, _ = _head_gap(values, index, gap.index_select(0, rows), alpha)
            head = head.index_copy(0, rows, head_rows)
    fraction = head / total.clamp_min(torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, fraction, torch.full_like(fraction, 0.5))


def _head_gap(values: torch.Tensor, index: torch.Tensor, gap: torch.Tensor, alpha: float):
    """Sum of ``gap`` over the head, given probabilities sorted in decreasing order."""
    cum = values.cumsum(-1)
    in_head = cum <= alpha
    in_head[..., 0] = True
    head = (gap.gather(-1, index) * in_head).sum(-1)
    return head, cum[..., -1]


@register_loss("akl")
def adaptive_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, alpha: float = 0.5
) -> torch.Tensor:
    """Adaptive KL (Wu et al. 2024): w * KL(P || Q) + (1 - w) * KL(Q || P).

    w = g_head / (g_head + g_tail), with g the summed |P - Q| over the teacher's head and tail
    (see :func:`akl_head_fraction`; ``alpha`` is the paper's mu). The weights are constants for
    autograd, as in the paper's code. Identical distributions give w = 0.5 and a zero loss.
    """
    check_unit_interval("akl alpha", alpha)
    log_p = F.log_softmax(teacher_logits, -1)
    log_q = F.log_softmax(student_logits, -1)
    with torch.no_grad():
        p = log_p.exp()
        w = akl_head_fraction(p, (p - log_q.exp()).abs(), alpha)
    return w * kl_from_log_probs(log_p, log_q) + (1.0 - w) * kl_from_log_probs(log_q, log_p)


@register_loss("tvd")
def total_variation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Total variation distance 0.5 * sum_v |P - Q|."""
    p = F.softmax(teacher_logits, -1)
    q = F.softmax(student_logits, -1)
    return 0.5 * (p - q).abs().sum(-1)


@register_loss("top1_ce")
def top1_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, weight_by_teacher: bool = False
) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's argmax token: -log Q(argmax P).

    Not a divergence (identical distributions give -log max P, not 0). ``weight_by_teacher``
    multiplies by the teacher's top-1 probability max P, which is KDFlow's ``top1_ce``.
    """
    index = teacher_logits.argmax(-1, keepdim=True)
    loss = -F.log_softmax(student_logits, -1).gather(-1, index).squeeze(-1)
    if weight_by_teacher:
        log_top = teacher_logits.gather(-1, index) - torch.logsumexp(teacher_logits, -1, keepdim=True)
        loss = loss * log_top.squeeze(-1).exp()
    return loss


@register_loss("hrl")
def hierarchical_ranking(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    topk: int = 5,
    margin: float = 0.0,
) -> torch.Tensor:
    """Hierarchical ranking loss over the teacher's top-k tokens, on (tempered) logits.

    With t_1..t_k the teacher's k most probable tokens in decreasing order, s the student's
    logits and m = ``margin``:

        order = sum_{i<j} relu(m - (s[t_i] - s[t_j]))          keep the teacher's order inside
        rest  = sum_{u in O} relu(m - (min_i s[t_i] - s[u]))    keep the top-k above the rest

    O is the k tokens outside the teacher's top-k that the student scores highest. The loss is
    order + rest: 0 exactly when the student ranks the teacher's top-k in the teacher's order and
    above every other token, each gap at least m (so m = 0 and identical logits give 0). Logit
    differences equal log-probability differences, so no softmax is needed. Padded (-inf)
    teacher entries never take part.
    """
    if topk < 1:
        raise ValueError(f"hrl topk must be >= 1, got {topk}")
    vocab = teacher_logits.shape[-1]
    k = min(topk, vocab)
    t_top, t_index = teacher_logits.topk(k, dim=-1)
    valid = torch.isfinite(t_top)
    s_at = student_logits.gather(-1, t_index).masked_fill(~valid, 0.0)
    upper = torch.ones(k, k, dtype=torch.bool, device=s_at.device).triu(1)
    pairs = upper & valid.unsqueeze(-1) & valid.unsqueeze(-2)
    order_gap = s_at.unsqueeze(-1) - s_at.unsqueeze(-2)  # [N, k, k]: s[t_i] - s[t_j]
    order = F.relu(margin - order_gap).masked_fill(~pairs, 0.0).sum((-1, -2))

    n_out = min(k, vocab - k)
    if n_out <= 0:
        return order
    s_top, s_index = student_logits.topk(min(2 * k, vocab), dim=-1)
    member = (s_index.unsqueeze(-1) == t_index.unsqueeze(-2)).any(-1)
    outsiders = s_top.masked_fill(member | ~torch.isfinite(s_top), _NEG_INF).topk(n_out, dim=-1).values
    present = torch.isfinite(outsiders)
    floor = s_at.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    rest_gap = floor - outsiders.masked_fill(~present, 0.0)
    rest = F.relu(margin - rest_gap).masked_fill(~present, 0.0).sum(-1)
    return order + rest
