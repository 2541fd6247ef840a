"""A kdlib plugin for the fault tests: vanilla KD that can poison chosen samples or go slowly.

Loaded like any user plugin (``plugins=[fault_plugins] algorithm=fault_injection``), so the faults
travel through the real run: composition, workers (local or Ray actors), the optimizer step.

- ``algorithm.nan_samples=[i, ...]``: a micro-batch holding one of these sample ids gets a NaN loss.
- ``algorithm.inf_grad_samples=[i, ...]``: its loss stays finite but its gradients become inf.
- ``KDLIB_TEST_STEP_SECONDS`` (environment): sleep this long per micro-batch, so that a test can
  send a signal to a run that is in the middle of training.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch

import kdlib
from kdlib.algorithms.vanilla import VanillaKD, VanillaKDConfig


@dataclass
class FaultInjectionConfig(VanillaKDConfig):
    name: str = "fault_injection"
    # Sample ids whose micro-batch gets a NaN loss.
    nan_samples: list[int] = field(default_factory=list)
    # Sample ids whose micro-batch gets infinite gradients (the loss itself stays finite).
    inf_grad_samples: list[int] = field(default_factory=list)


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; the gradient flowing back is multiplied by inf."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@kdlib.register_algorithm("fault_injection", config=FaultInjectionConfig)
class FaultInjection(VanillaKD):
    cfg: FaultInjectionConfig

    def compute_loss(self, student, batch, teacher, normaliser):
        time.sleep(float(os.environ.get("KDLIB_TEST_STEP_SECONDS", "0")))
        terms = super().compute_loss(student, batch, teacher, normaliser)
        ids = set(batch.sample_ids)
        if ids & set(self.cfg.nan_samples):
            terms = dataclasses.replace(terms, loss=terms.loss * float("nan"))
        if ids & set(self.cfg.inf_grad_samples):
            terms = dataclasses.replace(terms, loss=_InfiniteGradient.apply(terms.loss))
        return terms
