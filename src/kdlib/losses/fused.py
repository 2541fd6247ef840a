"""Fused, chunked KD + CE loss from hidden states: never materialises [tokens, vocab] logits.

With a 150k vocabulary the logits are the largest tensors of a KD step: N x V floats for the
student, the same for the teacher, and autograd keeps several more of that size for the backward
pass. Here the loss is computed in one pass over chunks of tokens. For each chunk the student's
and the teacher's logits are recomputed from hidden states and the two heads, the divergence and
its gradient with respect to the student logits are evaluated, the cross-entropy term is added,
and the gradients with respect to the student hidden states, head weight and bias are
accumulated at once (``addmm`` into a [V, H] buffer). Backward then only scales the stored
gradients. Memory is O(chunk x V) plus the gradient of the head weight, which training needs
anyway; the logits of the chunk are computed once and shared by both terms.

The gradient of a divergence with respect to the chunk's logits comes from autograd on its
registered formula, so user losses work unchanged, or, for the built-in divergences, from a
closed form evaluated in place in reused buffers (several times faster on CPU; checked against
autograd in the tests). ``closed_form=False`` forces autograd for every loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from kdlib.config.schema import LossConfig
from kdlib.losses.closed_form import CLOSED_FORM
from kdlib.losses.terms import LossTerms
from kdlib.losses.registry import LOSSES, loss_params
from kdlib.models.head import LMHead

log = logging.getLogger(__name__)

# Tokens per chunk when the caller gives none: about 150 MB per float32 [chunk, 151936] buffer.
DEFAULT_CHUNK_SIZE = 256
# Targets equal to this take no part in the CE term (as in torch.nn.functional.cross_entropy).
IGNORE_INDEX = -100

Kernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class _Head:
    """One side's output head, already cut to the vocabulary rows the loss needs."""

    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]
    scale: float
    softcap: Optional[float]


@dataclass(frozen=True)
class _Plan:
    """Everything about one loss evaluation except the student tensors autograd tracks."""

    kernel: Optional[Kernel]  # None: no KD term
    params: dict
    temperature: float
    value_scale: float  # T^2 or 1, applied to the per-token divergence
    kd_weight: float
    ce_weight: float
    chunk_size: int
    vocab: int  # common vocabulary min(Vs, Vt) (Vs without a teacher)
    student: _Head  # weight [Vs, Hs]
    teacher: Optional[_Head]  # weight already cut to [vocab, Ht]
    teacher_hidden: Optional[torch.Tensor]
    targets: Optional[torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Public entry points


def fused_kd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[torch.Tensor] = None,
    *,
    loss: str = "kl",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
    targets: Optional[torch.Tensor] = None,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    closed_form: bool = True,
    **params: Any,
) -> torch.Tensor:
    """``kd_weight * sum_tokens KD + ce_weight * sum_tokens CE``, chunk by chunk (callers normalise).

    ``student_hidden`` [N, Hs] and ``student_head`` [Vs, Hs] (and ``student_bias`` [Vs]) get
    gradients; the teacher side ([N, Ht], [Vt, Ht]) is a constant. Logits are
    ``softcap(scale * (hidden @ head.T + bias))`` as in :class:`kdlib.models.head.LMHead`. KD is
    the registered divergence ``loss`` (its parameters as keyword arguments) on the common
    vocabulary min(Vs, Vt), with logits divided by ``temperature`` and, optionally, the value
    multiplied by T^2. CE (when ``targets`` [N] is given; -100 is ignored) uses the untempered
    student logits over the full student vocabulary. Without a teacher only CE is computed.
    At most ``chunk_size`` tokens' logits exist at a time.
    """
    total, _, _ = _evaluate(
        student_hidden, student_head, student_bias, student_logit_scale, student_softcap,
        teacher_hidden, teacher_head, teacher_bias, teacher_logit_scale, teacher_softcap,
        targets, loss=loss, params=params, chunk_size=chunk_size, temperature=temperature,
        scale_by_temperature_squared=scale_by_temperature_squared,
        kd_weight=kd_weight, ce_weight=ce_weight, closed_form=closed_form,
    )
    return total


def fused_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: Optional[torch.Tensor],
    teacher_head: Optional[LMHead],
    targets: Optional[torch.Tensor],
    cfg: LossConfig,
    *,
    kd_weight: float,
    ce_weight: float,
    normaliser: float,
) -> LossTerms:
    """The fused counterpart of ``naive_distillation_loss``, with the same :class:`LossTerms`."""
    if teacher_hidden is not None and teacher_head is None:
        raise ValueError("a teacher hidden state needs the teacher head")
    teacher = teacher_head if teacher_hidden is not None else None
    total, kd_sum, ce_sum = _evaluate(
        student_hidden, student_head.weight, student_head.bias, student_head.logit_scale,
        student_head.softcap,
        teacher_hidden,
        None if teacher is None else teacher.weight,
        None if teacher is None else teacher.bias,
        1.0 if teacher is None else teacher.logit_scale,
        None if teacher is None else teacher.softcap,
        targets, loss=cfg.name, params=loss_params(cfg), chunk_size=cfg.chunk_size,
        temperature=cfg.temperature, scale_by_temperature_squared=cfg.scale_by_temperature_squared,
        kd_weight=kd_weight, ce_weight=ce_weight, closed_form=True,
    )
    return LossTerms(
        loss=total / normaliser, kd_sum=kd_sum, ce_sum=ce_sum, n_tokens=student_hidden.shape[0]
    )


# ----------------------------------------------------------------------------------------------
# Validation and dispatch


def _evaluate(
    student_hidden, student_weight, student_bias, student_scale, student_softcap,
    teacher_hidden, teacher_weight, teacher_bias, teacher_scale, teacher_softcap,
    targets, *, loss, params, chunk_size, temperature, scale_by_temperature_squared,
    kd_weight, ce_weight, closed_form,
):
    """(differentiable total, detached kd_sum, detached ce_sum) after checking the inputs."""
    if student_hidden.dim() != 2 or student_weight.dim() != 2:
        raise ValueError(
            f"fused loss: student hidden must be [N, H] and head [V, H], got "
            f"{tuple(student_hidden.shape)} and {tuple(student_weight.shape)}"
        )
    n, hidden = student_hidden.shape
    if student_weight.shape[1] != hidden:
        raise ValueError(
            f"fused loss: student hidden size {hidden} != head hidden size {student_weight.shape[1]}"
        )
    if chunk_size < 1:
        raise ValueError(f"fused loss: chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"fused loss: temperature must be > 0, got {temperature}")
    if targets is not None:
        targets = targets.reshape(-1).long()
        if targets.shape[0] != n:
            raise ValueError(f"fused loss: {targets.shape[0]} targets for {n} tokens")
    vocab = student_weight.shape[0]
    teacher = None
    kernel = None
    if teacher_hidden is not None:
        if teacher_weight is None:
            raise ValueError("fused loss: teacher_hidden needs teacher_head")
        if teacher_hidden.shape[0] != n:
            raise ValueError(
                f"fused loss: teacher sent hidden states for {teacher_hidden.shape[0]} tokens, "
                f"the student has {n}"
            )
        if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(
                f"fused loss: teacher hidden size {teacher_hidden.shape[-1]} != "
                f"head hidden size {teacher_weight.shape[1]}"
            )
        vocab = min(vocab, teacher_weight.shape[0])
        bias = None if teacher_bias is None else teacher_bias.detach()[:vocab]
        teacher = _Head(teacher_weight.detach()[:vocab], bias, teacher_scale, teacher_softcap)
        teacher_hidden = teacher_hidden.detach()
        kernel = _kernel_for(loss, params, closed_form)
    plan = _Plan(
        kernel=kernel, params=params, temperature=float(temperature),
        value_scale=float(temperature) ** 2 if scale_by_temperature_squared else 1.0,
        kd_weight=float(kd_weight), ce_weight=float(ce_weight), chunk_size=int(chunk_size),
        vocab=vocab, student=_Head(student_weight, student_bias, student_scale, student_softcap),
        teacher=teacher, teacher_hidden=teacher_hidden, targets=targets,
    )
    tracked = [student_hidden, student_weight] + ([student_bias] if student_bias is not None else [])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return _FusedLoss.apply(student_hidden, student_weight, student_bias, plan)
    with torch.no_grad():
        total, kd_sum, ce_sum, _ = _run(plan, student_hidden, (False, False, False))
    return total, kd_sum, ce_sum


def _kernel_for(name: str, params: dict, closed_form: bool) -> Kernel:
    """The per-chunk value (and gradient) kernel of a registered loss, params checked."""
    entry = LOSSES.entry(name)
    cfg_cls = entry.config_cls
    if cfg_cls is not None:
        known = set(cfg_cls.__dataclass_fields__) - set(LossConfig.__dataclass_fields__)
        unknown = sorted(set(params) - known)
        if unknown:
            raise TypeError(
                f"loss {name!r} has no parameter(s) {unknown}; "
                f"its parameters: {sorted(known) or 'none'}"
            )
    fn = entry.load()
    if closed_form and fn in CLOSED_FORM:
        return CLOSED_FORM[fn]
    return _autograd_kernel(name, fn)


class _FusedLoss(torch.autograd.Function):
    """Forward does all the work and keeps the gradients; backward scales them."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, plan):
        needs = tuple(ctx.needs_input_grad[:3])
        total, kd_sum, ce_sum, grads = _run(plan, student_hidden, needs)
        ctx.grads = grads
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return total, kd_sum, ce_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("the fused KD loss was already differentiated without retain_graph")
        if _graph_is_kept():  # another backward may follow (retain_graph, gradcheck): copy
            return (*(None if g is None else g * grad_total.to(g.dtype) for g in grads), None)
        # Last use: scale in place and hand the buffers to autograd, which adopts them as .grad
        # without a copy (so the [V, H] weight gradient exists once).
        ctx.grads = None
        for g in grads:
            if g is not None:
                g.mul_(grad_total.to(g.dtype))
        return (*grads, None)


def _graph_is_kept() -> bool:
    """Whether the running backward pass keeps the graph (True when torch cannot say)."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


# ----------------------------------------------------------------------------------------------
# The chunk loop


class _Workspace:
    """Named [chunk, cols] buffers, allocated once and reused by every chunk."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows = rows
        self.dtype = dtype
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[1] != cols:
            buf = torch.empty(self.rows, cols, dtype=self.dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:rows]


def _run(plan: _Plan, hidden: torch.Tensor, needs: tuple[bool, bool, bool]):
    """Loop over chunks: values, and the gradients flagged in ``needs`` (hidden, weight, bias)."""
    student = plan.student
    n, hidden_size = hidden.shape
    device = hidden.device
    vocab_s = student.weight.shape[0]
    has_ce = plan.targets is not None
    has_kd = plan.kernel is not None
    cols = vocab_s if has_ce else plan.vocab  # student logits the loss reads
    weight = student.weight.detach()[:cols]
    bias = None if student.bias is None else student.bias.detach()[:cols]
    compute_dtype = weight.dtype
    # float32 arithmetic whatever the input dtype (float64 inputs stay float64, for gradcheck)
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    want_h, want_w, want_b = needs
    kd_grad = has_kd and plan.kd_weight != 0.0
    ce_grad = has_ce and plan.ce_weight != 0.0
    any_grad = (want_h or want_w or want_b) and (kd_grad or ce_grad)
    kd_grad = kd_grad and any_grad
    ce_grad = ce_grad and any_grad

    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if want_h else None
    grad_w = torch.zeros(vocab_s, hidden_size, dtype=acc, device=device) if want_w else None
    grad_b = torch.zeros(vocab_s, dtype=acc, device=device) if want_b else None
    kd_rows = torch.zeros(n, dtype=acc, device=device)
    ce_rows = torch.zeros(n, dtype=acc, device=device)

    chunk = min(plan.chunk_size, max(n, 1))
    ws = _Workspace(chunk, acc, device)
    temperature = plan.temperature
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = stop - start
        h = hidden[start:stop].detach().to(compute_dtype)
        tanh = ws.get("tanh", rows, cols) if (student.softcap is not None and any_grad) else None
        z = _logits_into(h, weight, bias, student, ws.get("z", rows, cols), tanh)

        dz = None  # gradient of the chunk's contribution to the total w.r.t. z
        if has_ce:
            targets = plan.targets[start:stop]
            ce_out = None
            if ce_grad:
                ce_out = z if not has_kd else ws.get("ce", rows, cols)
            ce_rows[start:stop] = _cross_entropy(z, targets, ce_out, plan.ce_weight, ws)
            dz = ce_out
        if has_kd:
            teacher = plan.teacher
            t = _logits_into(
                plan.teacher_hidden[start:stop].to(teacher.weight.dtype), teacher.weight,
                teacher.bias, teacher, ws.get("t", rows, plan.vocab), None,
            )
            s = z[:, : plan.vocab]  # a view: rows are strided when the student vocab is larger
            if temperature != 1.0:
                s.div_(temperature)
                t.div_(temperature)
            values = plan.kernel(s, t, ws, kd_grad, **plan.params)
            kd_rows[start:stop] = values if plan.value_scale == 1.0 else values * plan.value_scale
            if kd_grad:
                alpha = plan.kd_weight * plan.value_scale / temperature
                if dz is None:
                    s.mul_(alpha)
                    if cols > plan.vocab:  # student logits beyond the teacher's: CE without grad
                        z[:, plan.vocab :].zero_()
                    dz = z
                else:
                    dz[:, : plan.vocab].add_(s, alpha=alpha)
        if dz is None:
            continue
        if tanh is not None:  # d softcap * tanh(x / softcap) / dx = 1 - tanh^2
            dz.mul_(tanh.square_().neg_().add_(1.0))
        if student.scale != 1.0:
            dz.mul_(student.scale)
        _accumulate_grads(dz, h, weight, start, stop, grad_h, grad_w, grad_b)

    del ws  # free the chunk buffers before the final casts
    if any_grad:
        grads = (
            grad_h,
            None if grad_w is None else grad_w.to(student.weight.dtype),
            None if grad_b is None else grad_b.to(student.bias.dtype),
        )
    else:
        grads = (
            None if not want_h else torch.zeros_like(hidden),
            None if not want_w else torch.zeros_like(student.weight),
            None if not want_b else torch.zeros_like(student.bias),
        )
    kd_sum = kd_rows.sum()
    ce_sum = ce_rows.sum()
    total = plan.kd_weight * kd_sum + plan.ce_weight * ce_sum
    return total, kd_sum, ce_sum, grads


def _logits_into(h, weight, bias, head: _Head, out, tanh_out):
    """``softcap(scale * (h @ weight.T + bias))`` written into ``out`` (float32 or float64)."""
    if weight.dtype == out.dtype:
        torch.mm(h, weight.t(), out=out)
    else:  # low precision: the same rounding as the model's own logits, then float32
        out.copy_(torch.mm(h, weight.t()))
    if bias is not None:
        out.add_(bias)
    if head.scale != 1.0:
        out.mul_(head.scale)
    if head.softcap is not None:
        out.div_(head.softcap).tanh_()
        if tanh_out is not None:
            tanh_out.copy_(out)
        out.mul_(head.softcap)
    return out


def _cross_entropy(z, targets, grad_out, weight, ws):
    """Per-row CE of logits ``z``; ``grad_out`` (may alias z) gets weight * (softmax - onehot)."""
    valid = targets != IGNORE_INDEX
    safe = targets.masked_fill(~valid, 0).unsqueeze(-1)
    picked = z.gather(-1, safe).squeeze(-1)
    rowmax = z.amax(-1, keepdim=True)
    e = grad_out if grad_out is not None else ws.get("ce_exp", z.shape[0], z.shape[1])
    torch.sub(z, rowmax, out=e)
    e.exp_()
    norm = e.sum(-1, keepdim=True)
    lse = (rowmax + norm.log()).squeeze(-1)
    ce = (lse - picked).masked_fill(~valid, 0.0)
    if grad_out is not None:
        grad_out.mul_(norm.reciprocal_().mul_(weight))
        grad_out.scatter_add_(-1, safe, torch.full_like(picked, -weight).unsqueeze(-1))
        if not bool(valid.all()):
            grad_out.masked_fill_(~valid.unsqueeze(-1), 0.0)
    return ce


def _accumulate_grads(dz, h, weight, start, stop, grad_h, grad_w, grad_b):
    """grad_h[start:stop] = dz @ W; grad_w += dz.T @ h; grad_b += dz.sum(0)."""
    cols = dz.shape[1]
    low = weight.dtype != dz.dtype
    dz_c = dz.to(weight.dtype) if low else dz
    if grad_h is not None:
        if grad_h.dtype == dz_c.dtype:
            torch.mm(dz_c, weight, out=grad_h[start:stop])
        else:
            grad_h[start:stop] = torch.mm(dz_c, weight)
    if grad_w is not None:
        if low:
            _addmm_low_precision(grad_w[:cols], dz_c.t(), h)
        else:
            grad_w[:cols].addmm_(dz_c.t(), h)
    if grad_b is not None:
        grad_b[:cols].add_(dz.sum(0))


_FP32_OUT_ADDMM: dict[tuple, bool] = {}


def _addmm_low_precision(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """float32 ``out += a @ b`` for bf16 ``a``, ``b``, without a float32 [V, H] temporary.

    On CUDA, ``addmm(..., out_dtype=float32)`` accumulates in place; it is checked once per
    device against a reference before use. Elsewhere the product is rounded to the inputs'
    dtype, then added.
    """
    key = (out.device.type, out.device.index, a.dtype)
    if out.device.type == "cuda":
        if key not in _FP32_OUT_ADDMM:
            _FP32_OUT_ADDMM[key] = _fp32_out_addmm_works(out.device, a.dtype)
        if _FP32_OUT_ADDMM[key]:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            return
    out.add_(torch.mm(a, b))


def _fp32_out_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build and device accumulate ``addmm(out_dtype=float32)`` correctly.

    The keyword is recent (older torch raises TypeError), and not every device and dtype has the
    kernel (RuntimeError / NotImplementedError): each of those means "use the fallback", which
    is exact too, only with a [rows, cols] temporary in the inputs' dtype; the reason is logged."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(8, 16, device=device, generator=g).to(dtype)
        b = torch.randn(16, 4, device=device, generator=g).to(dtype)
        acc = torch.randn(8, 4, device=device, generator=g)
        expected = acc + a.float() @ b.float()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, expected, rtol=1e-3, atol=1e-3))
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        log.debug("addmm(out_dtype=float32) unavailable on %s for %s (%s); rounding the product first",
                  device, dtype, exc)
        return False


# ----------------------------------------------------------------------------------------------
# The autograd kernel: (s, t, ws, need_grad, **params) -> values [rows], the protocol of the
# closed-form kernels in kdlib.losses.divergences, for any registered formula.


def _autograd_kernel(name: str, fn: Callable[..., torch.Tensor]) -> Kernel:
    """Value and gradient of any registered formula, by autograd on the chunk's logits."""

    def kernel(s, t, ws, need_grad, **params):
        if not need_grad:
            return _check_values(name, fn(s, t, **params), s.shape[0]).to(s.dtype)
        with torch.enable_grad():
            leaf = s.detach().requires_grad_(True)
            values = _check_values(name, fn(leaf, t, **params), s.shape[0])
            if values.requires_grad:
                (grad,) = torch.autograd.grad(values.sum(), leaf, allow_unused=True)
            else:
                grad = None
        values = values.detach().to(s.dtype)
        if grad is None:
            s.zero_()
        else:
            s.copy_(grad)
        return values

    return kernel


def _check_values(name: str, values: torch.Tensor, rows: int) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.shape != (rows,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(
            f"loss {name!r} must return one value per token, shape ({rows},); got {shape}"
        )
    return values
