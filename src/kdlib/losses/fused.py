"""Same-tokenizer KD + CE from hidden states on the chunked engine: never [tokens, vocab] logits.

Vanilla hidden-state KD compares, token by token, the student's logits with the teacher's logits
recomputed from the teacher's final hidden states and its head. This module is that objective as a
fast-path term of :mod:`kdlib.losses.engine` (:class:`HiddenStateDivergence`: per chunk, the
teacher's logits into a reused buffer, then the registered divergence's value and its gradient
with respect to the student logits) and the two entry points that describe a call as typed data
(:class:`~kdlib.models.head.LMHead` for each head, :class:`DivergenceSpec` for the loss) and hand
it to the engine. The gradient of a divergence comes from a closed form evaluated in place
(:mod:`kdlib.losses.closed_form`, for the built-ins) or from autograd on its registered formula,
so user losses work unchanged; ``closed_form=False`` forces autograd for every loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional

import torch

from kdlib.config.schema import LossConfig
from kdlib.losses.chunk_math import Workspace, log_probs_, teacher_logits_into
from kdlib.losses.closed_form import CLOSED_FORM
from kdlib.losses.engine import TARGET_LOGPROB, LogitTerm, Plan, evaluate_terms, even_chunks
from kdlib.losses.policy_gradient import PolicyGradient
from kdlib.losses.registry import LOSSES, loss_params
from kdlib.losses.terms import LossTerms
from kdlib.models.head import LMHead

# Tokens per chunk when the caller gives none: about 150 MB per float32 [chunk, 151936] buffer.
DEFAULT_CHUNK_SIZE = 256

# (s, t, ws, need_grad, **params) -> values [rows]; the protocol of kdlib.losses.closed_form.
Kernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DivergenceSpec:
    """The KD divergence of one call and how it is applied (a LossConfig's fields, as data)."""

    name: str
    params: dict = field(default_factory=dict)
    temperature: float = 1.0
    scale_by_temperature_squared: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # False: autograd on the registered formula even where a closed form exists.
    closed_form: bool = True


def spec_of(cfg: LossConfig) -> DivergenceSpec:
    """The divergence a loss config describes."""
    return DivergenceSpec(cfg.name, loss_params(cfg), cfg.temperature, cfg.scale_by_temperature_squared,
                          cfg.chunk_size)


@dataclass(frozen=True)
class HiddenStateDivergence(LogitTerm):
    """A registered divergence between the teacher's distribution, from its hidden states and
    head, and the student's, on their common vocabulary (the first ``columns`` entries)."""

    teacher: Mapping[str, torch.Tensor]  # {"hidden": [N, Ht]}, constant
    head: LMHead  # the teacher's, cut to the common vocabulary, constant
    kernel: Kernel
    params: dict
    columns: int
    temperature: float
    value_scale: float

    def kd_values(self, s, teacher, ws: Workspace, need_grad: bool) -> torch.Tensor:
        t = teacher_logits_into(teacher["hidden"], self.head, ws.get("t", s.shape[0], self.columns),
                                self.temperature)
        log_probs_(t, ws.get("p", s.shape[0], self.columns))
        if TARGET_LOGPROB in teacher:  # on-policy distillation reads log p_teacher(target)
            teacher[TARGET_LOGPROB].copy_(t.gather(-1, teacher["targets"].clamp(min=0).unsqueeze(-1)).squeeze(-1))
        return self.kernel(s, t, ws, need_grad, **self.params)


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
    student = LMHead(student_head, student_bias, student_logit_scale, student_softcap)
    teacher = None if teacher_head is None else LMHead(teacher_head, teacher_bias, teacher_logit_scale, teacher_softcap)
    spec = DivergenceSpec(loss, params, temperature, scale_by_temperature_squared, chunk_size, closed_form)
    total, _, _, _ = _evaluate(student_hidden, student, teacher_hidden, teacher, targets, spec,
                               kd_weight=kd_weight, ce_weight=ce_weight)
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
    pg: Optional[PolicyGradient] = None,
) -> LossTerms:
    """The fused counterpart of ``naive_distillation_loss``, with the same :class:`LossTerms`."""
    if teacher_hidden is not None and teacher_head is None:
        raise ValueError("a teacher hidden state needs the teacher head")
    total, kd_sum, ce_sum, pg_sum = _evaluate(student_hidden, student_head, teacher_hidden, teacher_head, targets,
                                              spec_of(cfg), kd_weight=kd_weight, ce_weight=ce_weight, pg=pg)
    return LossTerms(
        loss=total / normaliser, kd_sum=kd_sum, ce_sum=ce_sum, n_tokens=student_hidden.shape[0],
        pg_sum=None if pg is None else pg_sum,
    )


# ----------------------------------------------------------------------------------------------
# From a described call to the engine's plan


def _evaluate(student_hidden, student: LMHead, teacher_hidden, teacher: Optional[LMHead], targets,
              spec: DivergenceSpec, *, kd_weight: float, ce_weight: float, pg: Optional[PolicyGradient] = None):
    """(differentiable total, detached kd_sum, ce_sum and pg_sum) after checking the inputs."""
    _check_student(student_hidden, student, spec)
    n = student_hidden.shape[0]
    if targets is not None:
        targets = targets.reshape(-1).long()
        if targets.shape[0] != n:
            raise ValueError(f"fused loss: {targets.shape[0]} targets for {n} tokens")
    term = None
    if teacher_hidden is not None:
        term = _hidden_state_term(spec, teacher_hidden, teacher, n, student.vocab_size)
    if pg is not None and pg.needs_teacher:
        if term is None or targets is None:
            raise ValueError("fused loss: on-policy distillation needs the teacher and the targets")
        if spec.temperature != 1.0:
            raise ValueError(f"fused loss: on-policy distillation compares log-probabilities at temperature 1, "
                             f"not loss.temperature={spec.temperature}")
        buffer = torch.empty(n, dtype=torch.float64 if student.weight.dtype == torch.float64 else torch.float32,
                             device=student_hidden.device)
        term = replace(term, teacher={**term.teacher, "targets": targets, TARGET_LOGPROB: buffer})
    plan = Plan(chunks=even_chunks(n, int(spec.chunk_size)), head=student, term=term, targets=targets,
                kd_weight=float(kd_weight), ce_weight=float(ce_weight), pg=pg)
    return evaluate_terms(plan, student_hidden, student.weight, student.bias)


def _check_student(hidden: torch.Tensor, head: LMHead, spec: DivergenceSpec) -> None:
    if hidden.dim() != 2 or head.weight.dim() != 2:
        raise ValueError(
            f"fused loss: student hidden must be [N, H] and head [V, H], got "
            f"{tuple(hidden.shape)} and {tuple(head.weight.shape)}"
        )
    if head.hidden_size != hidden.shape[1]:
        raise ValueError(
            f"fused loss: student hidden size {hidden.shape[1]} != head hidden size {head.hidden_size}"
        )
    if spec.chunk_size < 1:
        raise ValueError(f"fused loss: chunk_size must be >= 1, got {spec.chunk_size}")
    if spec.temperature <= 0:
        raise ValueError(f"fused loss: temperature must be > 0, got {spec.temperature}")


def _hidden_state_term(spec: DivergenceSpec, teacher_hidden: torch.Tensor, teacher: Optional[LMHead], n: int,
                       student_vocab: int) -> HiddenStateDivergence:
    """The KD term on the common vocabulary, after checking the teacher's side against the student's."""
    if teacher is None:
        raise ValueError("fused loss: teacher_hidden needs teacher_head")
    if teacher_hidden.shape[0] != n:
        raise ValueError(
            f"fused loss: teacher sent hidden states for {teacher_hidden.shape[0]} tokens, the student has {n}"
        )
    if teacher_hidden.shape[-1] != teacher.hidden_size:
        raise ValueError(
            f"fused loss: teacher hidden size {teacher_hidden.shape[-1]} != head hidden size {teacher.hidden_size}"
        )
    vocab = min(student_vocab, teacher.vocab_size)
    bias = None if teacher.bias is None else teacher.bias.detach()[:vocab]
    temperature = float(spec.temperature)
    return HiddenStateDivergence(
        teacher={"hidden": teacher_hidden.detach()},
        head=replace(teacher, weight=teacher.weight.detach()[:vocab], bias=bias),
        kernel=kernel_for(spec.name, spec.params, spec.closed_form),
        params=spec.params,
        columns=vocab,
        temperature=temperature,
        value_scale=temperature**2 if spec.scale_by_temperature_squared else 1.0,
    )


def kernel_for(name: str, params: dict, closed_form: bool) -> Kernel:
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
