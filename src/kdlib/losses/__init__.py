"""Divergences between teacher and student distributions, and the KD objective built on them.

``kdlib.losses.get(name)`` returns a per-token loss ``(student_logits, teacher_logits, **params)``;
``kdlib.register_loss`` adds a user's divergence; ``distillation_loss`` computes the training
objective from hidden states (fused and chunked by default); ``fused_kd_loss`` is the fused,
chunked loss on its own, for any registered divergence.
"""

from kdlib.losses import divergences as _builtin_divergences  # noqa: F401  (registers the built-ins)
from kdlib.losses.objective import distillation_loss, get, per_token_divergence
from kdlib.losses.terms import LossTerms
from kdlib.losses.fused import fused_kd_loss
from kdlib.losses.registry import LOSSES, loss_params, register_loss

__all__ = [
    "LOSSES",
    "LossTerms",
    "distillation_loss",
    "fused_kd_loss",
    "get",
    "loss_params",
    "per_token_divergence",
    "register_loss",
]
