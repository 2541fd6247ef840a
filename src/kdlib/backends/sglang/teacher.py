"""SGLang teacher backend: one SGLang Engine per teacher worker, prefill only, hidden states out.

The engine starts with hidden-state return on, the radix cache and chunked prefill off (both would
leave prompt positions without a hidden state, see :mod:`kdlib.backends.sglang.outputs`), a static
memory fraction, and the memory saver when the teacher releases memory between phases
(``pipeline.colocate``): ``release_memory_occupation`` / ``resume_memory_occupation`` with
``teacher.backend.offload_tags``, with a host copy of the weights when they are released (SGLang
otherwise resumes with lost weights). A micro-batch is scored with one ``generate`` call
(``max_new_tokens=1``; prefill-only requests return no hidden states in 0.5.23), and the rows at
the loss positions are sent on. With ``teacher.signal.kind=topk`` the engine returns its own top-k
prompt log-probabilities instead (``return_logprob``, ``logprob_start_len=0``,
``top_logprobs_num``), without hidden states, a head or its self-check; the tail mass is what the
full-vocabulary log-probabilities leave (:func:`kdlib.signals.tail_from_logprobs`).

The engine owns the model, so the students' copy of the head is read from the checkpoint files
(:func:`~kdlib.models.checkpoint_head.load_lm_head`). Before any data is scored a self-check runs
a probe prompt and compares ``log_softmax(head(engine hidden states))`` with the engine's own
log-probabilities of a spread of token ids at every position; a mismatch (pre-norm hidden states,
a head that is not the engine's) stops the run. This is SGLang's version of ``verify_lm_head``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from kdlib.backends.base import TeacherBackend
from kdlib.backends.sglang.engine import SGLangEngine, server_args
from kdlib.backends.sglang.options import SGLangTeacherOptions
from kdlib.backends.sglang.outputs import (
    input_token_ids_logprobs,
    input_top_logprobs,
    logprob_of_next_tokens,
    prefill_hidden,
)
from kdlib.batch import TokenBatch, split_samples
from kdlib.config.models import ModelConfig, TeacherConfig
from kdlib.config.signal import SignalKind
from kdlib.errors import ModelError
from kdlib.models.checkpoint_head import load_lm_head
from kdlib.models.head import LMHead
from kdlib.models.loading import model_location
from kdlib.signals import tail_from_logprobs
from kdlib.teacher_output import TeacherOutput, id_dtype

log = logging.getLogger(__name__)

# One new token (greedy): the request is scored by its prefill; see outputs.py.
SCORING = {"max_new_tokens": 1, "temperature": 0.0}
# Head self-check: probe length, token ids compared per position, and the tolerance on log-probs,
# ATOL + RTOL * (largest |logit| of the probe). The engine rounds its logits to bf16 (relative
# 2**-9), so bf16 models differ by well under 1% of the logit scale; a wrong head or pre-norm
# states differ by the order of the scale itself.
PROBE_TOKENS = 24
PROBE_IDS = 32
HEAD_CHECK_ATOL = 0.02
HEAD_CHECK_RTOL = 0.01


@dataclass(frozen=True)
class HeadCheck:
    """Outcome of the head self-check (logged; kept on the backend for tests)."""

    max_error: float  # largest |head log-prob - engine log-prob|, nats
    tolerance: float
    positions: int
    token_ids: int


class SGLangTeacherBackend(TeacherBackend):
    name = "sglang"

    def __init__(self, cfg: TeacherConfig, device: torch.device, architecture: Optional[ModelConfig] = None) -> None:
        super().__init__(cfg, device)
        if architecture is not None:
            raise ModelError("teacher/backend=sglang cannot build a self-distillation teacher (teacher.from_student)")
        self.options: SGLangTeacherOptions = cfg.backend
        self._tags = list(self.options.offload_tags or [])
        self._released = False
        # the engine's own top-k is the signal: no hidden states, so no head and no self-check
        self.topk = SignalKind(cfg.signal.kind) is SignalKind.topk
        self._head = None if self.topk else load_lm_head(cfg)
        self.engine = SGLangEngine(self._server_args(cfg, device), "teacher")
        self.head_check: Optional[HeadCheck] = None
        if self.topk:
            return
        try:
            self.head_check = check_head(self.engine, self._head)
        except BaseException:
            self.engine.shutdown()
            raise
        log.info("SGLang teacher head self-check: max |log-prob error| %.3g (tolerance %.3g) over %d positions x %d ids",
                 self.head_check.max_error, self.head_check.tolerance, self.head_check.positions, self.head_check.token_ids)

    def _server_args(self, cfg: TeacherConfig, device: torch.device) -> dict:
        return server_args(
            self.options, cfg, model_path=model_location(cfg.model), device=device,
            enable_return_hidden_states=not self.topk,
            disable_radix_cache=True,
            chunked_prefill_size=-1,
            enable_memory_saver=bool(self._tags),
            enable_weights_cpu_backup="weights" in self._tags and self.options.weights_cpu_backup,
        )

    def lm_head(self) -> LMHead:
        if self._head is None:
            raise ModelError("teacher/backend=sglang with teacher.signal=topk sends the engine's log-probabilities; it loads no head")
        return self._head

    def score(self, batch: TokenBatch) -> TeacherOutput:
        samples = split_samples(batch)
        inputs = [s.input_ids for s in samples]
        if not self.topk:
            outputs = self.engine.generate(inputs, SCORING, return_hidden_states=True)
            return TeacherOutput(hidden=torch.cat([
                prefill_hidden(output, len(sample.input_ids), sample.loss_positions.tolist(), "teacher")
                for sample, output in zip(samples, outputs)
            ]))
        signal = self.cfg.signal
        outputs = self.engine.generate(inputs, SCORING, return_logprob=True, logprob_start_len=0,
                                       top_logprobs_num=signal.k)
        ids, values = zip(*(input_top_logprobs(output, sample.loss_positions, signal.k, "teacher")
                            for sample, output in zip(samples, outputs)))
        logprobs = torch.cat(values)
        return TeacherOutput(
            topk_ids=torch.cat(ids).to(id_dtype(self._vocab_size())), topk_logprobs=logprobs,
            topk_tail=tail_from_logprobs(logprobs) if signal.tail_mass else None,
        )

    def _vocab_size(self) -> int:
        """The teacher's vocabulary (the ids' wire dtype), from its checkpoint's config."""
        if not hasattr(self, "_vocab"):
            from kdlib.models.loading import text_vocab_size

            self._vocab = text_vocab_size(self.cfg)
        return self._vocab

    def sleep(self) -> None:
        if self._tags and not self._released:
            self.engine.release(self._tags)
            self._released = True

    def wake(self) -> None:
        if self._released:
            self.engine.resume(self._tags)
            self._released = False


def check_head(engine: SGLangEngine, head: LMHead) -> HeadCheck:
    """Compare ``log_softmax(head(hidden))`` with the engine's log-probs on a probe prompt."""
    vocab = head.vocab_size
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, vocab, (PROBE_TOKENS,), generator=generator).tolist()
    spread = torch.linspace(0, vocab - 1, PROBE_IDS).round().long().tolist()
    token_ids = sorted(set(spread) | set(probe))
    (output,) = engine.generate(
        [probe], SCORING, return_hidden_states=True, return_logprob=True, logprob_start_len=0,
        token_ids_logprob=token_ids,
    )
    hidden = prefill_hidden(output, len(probe), range(len(probe) - 1), "teacher head self-check")
    logits = _float32_logits(head, hidden)
    ours = torch.log_softmax(logits, dim=-1)
    engine_ids = input_token_ids_logprobs(output, token_ids, "teacher head self-check")
    engine_next = logprob_of_next_tokens(output, "teacher head self-check")
    next_ids = torch.tensor(probe[1:])
    error = max(
        (ours[:, token_ids] - engine_ids).abs().max().item(),
        (ours.gather(1, next_ids[:, None])[:, 0] - engine_next).abs().max().item(),
    )
    tolerance = HEAD_CHECK_ATOL + HEAD_CHECK_RTOL * logits.abs().max().item()
    result = HeadCheck(error, tolerance, hidden.shape[0], len(token_ids))
    if not error <= tolerance:  # NaN fails too
        raise ModelError(
            f"teacher.backend=sglang: head self-check failed: log_softmax(lm_head(hidden states)) differs "
            f"from the engine's own log-probabilities by up to {error:.3g} nats (tolerance {tolerance:.3g}) "
            f"on a {len(probe)}-token probe; the engine's hidden states are not the post-norm input of "
            "the checkpoint's head (a model whose SGLang code returns pre-norm states, an aux-hidden-state "
            "capture, or a head from another checkpoint), so hidden-state KD would be wrong"
        )
    return result


def _float32_logits(head: LMHead, hidden: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """``head``'s logits for ``hidden`` computed in float32, a slice of the vocabulary at a time
    (no float32 copy of a whole 150k-row head)."""
    hidden = hidden.to(device=head.weight.device, dtype=torch.float32)
    pieces = []
    for start in range(0, head.vocab_size, chunk):
        bias = None if head.bias is None else head.bias[start : start + chunk].float()
        pieces.append(torch.nn.functional.linear(hidden, head.weight[start : start + chunk].float(), bias))
    return head.finish(torch.cat(pieces, dim=-1)).cpu()
