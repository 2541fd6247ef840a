"""Served teacher backend: the teacher's top-k log-probabilities from an OpenAI-compatible server.

kdlib runs no teacher model here. A micro-batch is cut into its samples (unpadded token ids and
loss positions), sent ``batch_size`` prompts per ``/v1/completions`` request, ``concurrency``
requests at a time, and the prompt's top-k log-probabilities at the loss positions come back as
the ``topk`` teacher signal (:mod:`.protocol`); the tail mass is what the k probabilities leave
(:func:`kdlib.signals.tail_from_logprobs`), as for every backend that returns log-probabilities.
Only ``teacher.signal.kind=topk`` is served (declared in the capabilities, so composition refuses
the others); there are no hidden states, so no head (the students need none with a top-k signal).

The teacher's ``model`` (or ``tokenizer``) is read for its vocabulary size and, with
``token_keys=text``, its tokenizer; its weights are never loaded. A failure (the server down,
timing out after the retries, answering something else) is one TeacherUnavailable line naming the URL,
which ends the run through the same path as any failing step: a checkpoint, then the error.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from kdlib.backends.base import TeacherBackend
from kdlib.backends.served.client import ServedClient
from kdlib.backends.served.options import ServedTeacherOptions, TokenKeys
from kdlib.backends.served.protocol import ProtocolError, TextKeys, choice_logprobs, completion_request, topk_at
from kdlib.batch import ScoredSample, TokenBatch, split_samples
from kdlib.config.models import ModelConfig, TeacherConfig
from kdlib.config.signal import SignalKind
from kdlib.errors import ModelError, TeacherUnavailable
from kdlib.models.head import LMHead
from kdlib.signals import tail_from_logprobs
from kdlib.teacher_output import TeacherOutput, id_dtype

log = logging.getLogger(__name__)


class ServedTeacherBackend(TeacherBackend):
    name = "served"

    def __init__(self, cfg: TeacherConfig, device: torch.device, architecture: Optional[ModelConfig] = None) -> None:
        super().__init__(cfg, device)
        if architecture is not None:
            raise ModelError("teacher/backend=served cannot build a self-distillation teacher (teacher.from_student)")
        if SignalKind(cfg.signal.kind) is not SignalKind.topk:
            raise ModelError(f"teacher/backend=served sends teacher.signal.kind=topk only, not {cfg.signal.kind.value}")
        from kdlib.models.loading import text_vocab_size

        self.options: ServedTeacherOptions = cfg.backend
        self.vocab_size = text_vocab_size(cfg)
        self.text_keys: Optional[TextKeys] = None
        if TokenKeys(self.options.token_keys) is TokenKeys.text:
            from kdlib.models.loading import load_tokenizer

            self.text_keys = TextKeys(load_tokenizer(cfg))
            if self.text_keys.ambiguous:
                log.info("teacher.backend.token_keys=text: %d token texts stand for %d ids; those tokens are left "
                         "out of the top-k", len(self.text_keys.ambiguous), sum(map(len, self.text_keys.ambiguous.values())))
        self.client = ServedClient(self.options)
        self.skipped = 0  # top-k entries left out so far (their text names several ids)

    def lm_head(self) -> LMHead:
        raise ModelError("teacher/backend=served sends the server's top-k log-probabilities; it has no head")

    def score(self, batch: TokenBatch) -> TeacherOutput:
        samples = split_samples(batch)
        size = self.options.batch_size
        groups = [samples[i : i + size] for i in range(0, len(samples), size)]
        k, keys = self.cfg.signal.k, TokenKeys(self.options.token_keys)
        bodies = [completion_request(self.options.model, [s.input_ids for s in g], k, keys, self.options.extra_logprobs)
                  for g in groups]
        parts = self.client.map(bodies, lambda response, i: self._read(response, groups[i]))
        ids = torch.cat([p[0] for p in parts])
        logprobs = torch.cat([p[1] for p in parts])
        skipped = sum(p[2] for p in parts)
        if skipped and not self.skipped:
            log.warning("teacher server %s: a top-k token's text names several token ids; such tokens are left out "
                        "of the top-k and counted in the tail (teacher.backend.token_keys=text)", self.client.url)
        self.skipped += skipped
        return TeacherOutput(
            topk_ids=ids.to(id_dtype(self.vocab_size)), topk_logprobs=logprobs,
            topk_tail=tail_from_logprobs(logprobs) if self.cfg.signal.tail_mass else None,
        )

    def _read(self, response: object, group: list[ScoredSample]) -> tuple[torch.Tensor, torch.Tensor, int]:
        k, keys = self.cfg.signal.k, TokenKeys(self.options.token_keys)
        try:
            tables = choice_logprobs(response, len(group))
            parts = [topk_at(table, len(s.input_ids), s.loss_positions.tolist(), k, keys, self.text_keys)
                     for table, s in zip(tables, group)]
        except ProtocolError as exc:
            raise TeacherUnavailable(f"teacher server {self.client.url}: unexpected answer: {exc}") from None
        ids = torch.cat([p[0] for p in parts])
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise TeacherUnavailable(f"teacher server {self.client.url}: token id {int(ids.max())} is beyond the teacher's "
                                     f"vocabulary of {self.vocab_size} (teacher.model names another tokenizer than the server's)")
        return ids, torch.cat([p[1] for p in parts]), sum(p[2] for p in parts)
