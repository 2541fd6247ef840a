"""Composition checks of ``teacher.signal``: pure functions of a config, run by :func:`kdlib.config.checks.validate`.

A top-k or sampled teacher signal must be one the teacher backend can send (itself, or computed
from its hidden states), one the algorithm learns from, and one the loss has an estimator for
(:func:`kdlib.losses.estimators.signal_support`); the loss is then evaluated once, value and
gradient, on a tiny random signal, so a combination that would be infinite (reverse KL against a
truncated teacher) is refused before any model loads, as one :class:`~kdlib.errors.ConfigError`
line naming the keys.
"""

from __future__ import annotations

from kdlib.config.schema import KDConfig
from kdlib.errors import ConfigError, first_line


def check_signal(cfg: KDConfig) -> None:
    """The teacher signal against the backend (which signals it can send), the algorithm (which it
    learns from) and the loss (which estimators exist), then the loss run once on a tiny signal."""
    from kdlib.algorithms import ALGORITHMS
    from kdlib.backends import TEACHER_BACKENDS, TeacherCapabilities
    from kdlib.losses import loss_params
    from kdlib.losses.estimators import signal_support

    signal = cfg.teacher.signal
    kind = signal.kind.value
    backend = cfg.teacher.backend.name
    caps: TeacherCapabilities = TEACHER_BACKENDS.entry(backend).info or TeacherCapabilities()
    if kind not in caps.signals and "hidden" not in caps.signals:
        raise ConfigError(f"teacher/backend={backend} sends teacher.signal={'|'.join(caps.signals)} only; "
                          f"teacher.signal.kind={kind} needs a backend that returns it or hidden states")
    algorithm = ALGORITHMS.get(cfg.algorithm.name)
    if algorithm.needs_teacher and kind not in algorithm.signals:
        raise ConfigError(f"algorithm={cfg.algorithm.name} learns from teacher.signal={'|'.join(algorithm.signals)}; "
                          f"teacher.signal.kind={kind} is not one of them")
    if not signal.sparse or not algorithm.needs_teacher or cfg.mode.value == "generate":
        return
    loss = cfg.loss
    if loss.temperature != 1.0:
        raise ConfigError(f"teacher.signal.kind={kind} carries log-probabilities at temperature 1; "
                          f"loss.temperature={loss.temperature:g} needs teacher.signal.kind=hidden")
    why = signal_support(loss.name, kind, loss_params(loss), signal.k)
    if why:
        raise ConfigError(f"loss={loss.name} cannot use teacher.signal.kind={kind}: {why}")
    _run_on_tiny_signal(cfg)


def _run_on_tiny_signal(cfg: KDConfig) -> None:
    """The loss's estimator on a tiny random signal (value and gradient): a non-finite value is
    refused (reverse KL against a truncated teacher), as is whatever the estimator rejects."""
    import torch

    from kdlib.losses.estimators import RANKED
    from kdlib.losses import loss_params
    from kdlib.losses.sparse import signal_distillation_loss
    from kdlib.models.head import LMHead
    from kdlib.teacher_output import TeacherOutput

    signal, loss = cfg.teacher.signal, cfg.loss
    ranked = RANKED[loss.name](**loss_params(loss)) if loss.name in RANKED else 0
    vocab = max(8, ranked + 2)
    k = min(signal.k, vocab - 1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, generator=g, requires_grad=True)
    head = LMHead(torch.randn(vocab, 4, generator=g))
    teacher_lp = torch.log_softmax(torch.randn(3, vocab, generator=g), -1)
    if signal.kind.value == "topk":
        values, ids = teacher_lp.topk(k, -1)
        tail = torch.logsumexp(teacher_lp.scatter(-1, ids, float("-inf")), -1) if signal.tail_mass else None
        output = TeacherOutput(topk_ids=ids, topk_logprobs=values, topk_tail=tail)
    else:
        ids = torch.multinomial(teacher_lp.exp(), signal.k, replacement=True, generator=g)
        output = TeacherOutput(sampled_ids=ids, sampled_logprobs=teacher_lp.gather(-1, ids))
    try:
        terms = signal_distillation_loss(hidden, head, output, None, loss, kd_weight=1.0, ce_weight=0.0, normaliser=1.0)
        terms.loss.backward()
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(f"loss={loss.name} on teacher.signal.kind={signal.kind.value}: {first_line(exc)}") from None
    if not (torch.isfinite(terms.loss) and torch.isfinite(hidden.grad).all()):
        hint = ("; set teacher.signal.tail_mass=true (without the tail the truncated teacher gives zero probability "
                "outside its top k)" if signal.kind.value == "topk" and not signal.tail_mass else "")
        raise ConfigError(f"loss={loss.name} on teacher.signal.kind={signal.kind.value} is not finite{hint}")
