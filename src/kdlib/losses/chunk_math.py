"""The in-place arithmetic of the engine's fast path: logits, cross-entropy and the head's backward.

With a 150k vocabulary every pass over a chunk of logits is bound by memory traffic, so the fast
path of :mod:`kdlib.losses.engine` never lets autograd see the logits: it writes them from hidden
states and a head into buffers reused by every chunk (:class:`Workspace`), computes the
cross-entropy and its gradient in closed form, and backpropagates the chunk's logit gradient
through the head by hand (``mm`` for the hidden states, ``addmm`` into a [V, H] buffer for the
weight). These functions are that arithmetic, shared by the engine and by terms that recompute a
teacher's logits from its hidden states; they hold no state beyond the workspace.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from kdlib.models.head import LMHead

log = logging.getLogger(__name__)

# Targets equal to this take no part in the CE term (as in torch.nn.functional.cross_entropy).
IGNORE_INDEX = -100


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (references, gradcheck), float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class Workspace:
    """Named [chunk, cols] buffers, allocated once and reused by every chunk (and, shared, by the
    evaluations of one micro-batch's parts: :mod:`kdlib.losses.shared_buffers`)."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows = rows
        self.dtype = dtype
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[1] != cols or buf.shape[0] < rows:
            buf = torch.empty(max(self.rows, rows), cols, dtype=self.dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:rows]


def logits_into(h: torch.Tensor, head: LMHead, out: torch.Tensor, tanh_out: Optional[torch.Tensor]) -> torch.Tensor:
    """``softcap(scale * (h @ head.weight.T + bias))`` written into ``out`` (float32 or float64);
    ``tanh_out`` (optional) receives the soft-cap's tanh, which its derivative needs."""
    weight = head.weight
    if weight.dtype == out.dtype:
        torch.mm(h, weight.t(), out=out)
    else:  # low precision: the same rounding as the model's own logits, then float32
        out.copy_(torch.mm(h, weight.t()))
    if head.bias is not None:
        out.add_(head.bias)
    if head.logit_scale != 1.0:
        out.mul_(head.logit_scale)
    if head.softcap is not None:
        out.div_(head.softcap).tanh_()
        if tanh_out is not None:
            tanh_out.copy_(out)
        out.mul_(head.softcap)
    return out


def teacher_logits_into(hidden: torch.Tensor, head: LMHead, out: torch.Tensor, temperature: float) -> torch.Tensor:
    """A teacher's tempered logits from its hidden states at the chunk's rows, written into
    ``out``: what every hidden-state KD term (one teacher, or an ensemble's members) divides."""
    t = logits_into(hidden.to(head.weight.dtype), head, out, None)
    if temperature != 1.0:
        t.div_(temperature)
    return t


def log_probs_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """x <- log_softmax(x) over each row, in place (``scratch``, the same shape, is overwritten).

    The one normalisation of teacher logits: the student's hidden-state term and a teacher that
    computes a top-k or sampled signal both call it, so a top-k signal covering the whole
    vocabulary holds exactly the log-probabilities the student would have recomputed."""
    x.sub_(x.amax(-1, keepdim=True))
    torch.exp(x, out=scratch)
    return x.sub_(scratch.sum(-1, keepdim=True).log_())


def cross_entropy(z, targets, grad_out, weight, ws: Workspace):
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


def accumulate_grads(dz, h, weight, rows: slice, grad_h, grad_w, grad_b) -> None:
    """grad_h[rows] = dz @ W; grad_w += dz.T @ h; grad_b += dz.sum(0) (each when not None)."""
    cols = dz.shape[1]
    low = weight.dtype != dz.dtype
    dz_c = dz.to(weight.dtype) if low else dz
    if grad_h is not None:
        if grad_h.dtype == dz_c.dtype:
            torch.mm(dz_c, weight, out=grad_h[rows])
        else:
            grad_h[rows] = torch.mm(dz_c, weight)
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
