"""StudentWorker: one data-parallel replica of the student, wherever a launcher places it.

A plain class, like the teacher worker. It owns the student model, its optimizer and schedule, and
the algorithm; per optimizer step it fetches the teacher outputs of its micro-batches from the
transport, accumulates gradients over them, clips and steps, and returns additive sums (loss terms,
token counts, timings) that the controller adds up across workers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import set_seed

from kdlib.algorithms import ALGORITHMS
from kdlib.batch import MicroBatch
from kdlib.config.schema import KDConfig
from kdlib.evaluation import HeldoutSums, heldout_sums
from kdlib.models.forward import hidden_at_loss_positions
from kdlib.models.head import LMHead, lm_head_of
from kdlib.models.loading import resolve_device
from kdlib.models.student import build_student
from kdlib.optim import build_optimizer, build_scheduler
from kdlib.transport import build_transport


class StudentWorker:
    def __init__(self, cfg: KDConfig, rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = resolve_device(cfg.device)
        set_seed(cfg.seed)
        self.model = build_student(cfg.student, self.device)
        self.transport = build_transport(cfg.transport)
        self.teacher_head: Optional[LMHead] = None
        self.algorithm = None
        self.optimizer = None
        self.scheduler = None

    def setup(self, teacher_head: Optional[LMHead], total_steps: int) -> None:
        """Receive the teacher head (None without a teacher) and build algorithm and optimizer."""
        if teacher_head is not None:
            teacher_head = teacher_head.detached(device=self.device)
        self.teacher_head = teacher_head
        algorithm_cls = ALGORITHMS.get(self.cfg.algorithm.name)
        self.algorithm = algorithm_cls(self.cfg.algorithm, self.cfg.loss, teacher_head)
        self.optimizer = build_optimizer(self.model, self.cfg.train)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, total_steps)

    def train_step(self, batches: list[MicroBatch], handles: list[Any], normaliser: float) -> dict[str, float]:
        """One optimizer step over this worker's micro-batches; returns additive sums."""
        assert self.algorithm is not None, "setup() must run before train_step()"
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        kd_sum = ce_sum = loss_sum = 0.0
        n_loss_tokens = n_tokens = 0
        for batch, handle in zip(batches, handles, strict=True):
            teacher = None if handle is None else self.transport.fetch(handle)
            if teacher is not None:
                teacher = type(teacher)(teacher.hidden.to(self.device))
            with self._autocast():
                terms = self.algorithm.compute_loss(self.model, batch.to(self.device), teacher, normaliser)
            terms.loss.backward()
            kd_sum += float(terms.kd_sum)
            ce_sum += float(terms.ce_sum)
            loss_sum += float(terms.loss.detach()) * normaliser
            n_loss_tokens += batch.n_loss_tokens
            n_tokens += batch.n_tokens
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        fetched = self.transport.stats.take()
        return {
            "loss_sum": loss_sum,
            "kd_sum": kd_sum,
            "ce_sum": ce_sum,
            "loss_tokens": float(n_loss_tokens),
            "tokens": float(n_tokens),
            "grad_norm": grad_norm,
            "lr": lr,
            "student_seconds": time.perf_counter() - start,
            "fetch_seconds": fetched.seconds,
            "fetched_bytes": float(fetched.bytes),
        }

    @torch.no_grad()
    def evaluate(self, batches: list[MicroBatch], handles: list[Any]) -> HeldoutSums:
        """Held-out sums of KL(teacher || student), CE and top-1 agreement."""
        self.model.eval()
        total = HeldoutSums()
        head = lm_head_of(self.model)
        for batch, handle in zip(batches, handles, strict=True):
            batch = batch.to(self.device)
            with self._autocast():
                hidden = hidden_at_loss_positions(self.model, batch.student)
            teacher_hidden = None if handle is None else self.transport.fetch(handle).hidden.to(self.device)
            total = total.add(
                heldout_sums(
                    hidden, head, teacher_hidden, self.teacher_head, batch.student.targets(),
                    chunk_size=self.cfg.loss.chunk_size,
                )
            )
        self.transport.stats.take()
        return total

    def save(self, path: Optional[str]) -> Optional[str]:
        """Write the student in Hugging Face format to ``path`` (the writing rank's; None on the
        others, which only take part in gathering); returns the path written."""
        if path is None:
            return None
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        return path

    def _autocast(self):
        """bf16 matrix products in the student's forward and backward when student.autocast is on
        (weights, optimizer and the loss stay in student.dtype)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.student.autocast)

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return float(norm)
