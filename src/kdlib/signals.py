"""A teacher's top-k or sampled signal computed from its hidden states and head: the reference source.

A teacher backend that returns hidden states (``hf``, the reference) serves every signal:
the teacher worker turns the hidden states into the configured ``teacher.signal`` here, one chunk
of rows at a time (never ``[rows, vocab]`` at once). The logits are computed exactly as the
student's hidden-state path recomputes them (the hidden states rounded to the wire dtype, the
head's matrix product, :func:`kdlib.losses.chunk_math.log_probs_` in the same chunks), so a top-k
signal of the whole vocabulary carries the log-probabilities the student would have computed, to
the bit.

Draws of the ``sampled`` signal are made per sample with a generator seeded by
``teacher.signal.seed`` and the sample's content key (its teacher tokens and trained span), so a
sample gets the same draws whichever micro-batch it is in, and a teacher cache holds what a live
teacher would draw. Samples without a key (fresh on-policy rollouts) draw from the worker's own
generator.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch

from kdlib.config.signal import SignalConfig, SignalKind
from kdlib.losses.chunk_math import accumulation_dtype, log_probs_, logits_into
from kdlib.models.head import LMHead
from kdlib.teacher_output import TeacherOutput, id_dtype


def sample_seed(seed: int, key: str) -> int:
    """The seed of one sample's draws: a function of the signal's seed and the sample's key."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def signal_from_hidden(
    output: TeacherOutput, head: LMHead, signal: SignalConfig, *, wire_dtype: torch.dtype, chunk_size: int,
    seeds: Optional[Sequence[int]] = None, generator: Optional[torch.Generator] = None,
) -> TeacherOutput:
    """``output`` (hidden states, with per-sample row offsets for ``sampled``) as ``signal``.

    ``seeds``: one per sample (``sampled``); without them ``generator`` draws."""
    kind = SignalKind(signal.kind)
    if kind is SignalKind.hidden:
        return output
    hidden = output.hidden.to(wire_dtype)
    vocab = head.vocab_size
    k = min(signal.k, vocab)
    rows = hidden.shape[0]
    acc = accumulation_dtype(head.weight)
    ids = torch.empty(rows, k, dtype=torch.long, device=hidden.device)
    logprobs = torch.empty(rows, k, dtype=acc, device=hidden.device)
    extra = torch.empty((rows,) if kind is SignalKind.topk else (rows, k), dtype=acc, device=hidden.device)
    buffer = torch.empty(min(chunk_size, max(rows, 1)), vocab, dtype=acc, device=hidden.device)
    scratch = torch.empty_like(buffer)
    for span, gen in _spans(output, kind, chunk_size, seeds, generator):
        n = span.stop - span.start
        lp = logits_into(hidden[span].to(head.weight.dtype), head, buffer[:n], None)
        log_probs_(lp, scratch[:n])
        if kind is SignalKind.topk:
            values, index = lp.topk(k, dim=-1)
            ids[span], logprobs[span] = index, values
            rest = lp.scatter_(-1, index, float("-inf"))  # the log of the mass outside the top k
            extra[span] = torch.logsumexp(rest, -1) if k < vocab else float("-inf")
        else:
            proposal = lp if signal.proposal_temperature == 1.0 else log_probs_(lp / signal.proposal_temperature, scratch[:n])
            draws = torch.multinomial(proposal.exp(), k, replacement=True, generator=gen)
            ids[span], logprobs[span], extra[span] = draws, lp.gather(-1, draws), proposal.gather(-1, draws)
    common = dict(row_offsets=output.row_offsets, sample_ids=output.sample_ids)
    ids = ids.to(id_dtype(vocab))
    if kind is SignalKind.topk:
        return TeacherOutput(topk_ids=ids, topk_logprobs=logprobs, topk_tail=extra if signal.tail_mass else None, **common)
    proposal = None if signal.proposal_temperature == 1.0 else extra
    return TeacherOutput(sampled_ids=ids, sampled_logprobs=logprobs, sampled_proposal=proposal, **common)


def _spans(output: TeacherOutput, kind: SignalKind, chunk_size: int, seeds: Optional[Sequence[int]],
           generator: Optional[torch.Generator]):
    """(row slice, generator) pairs covering every row: even chunks for top-k (the student's own
    chunks, so logits are computed on the same shapes), each sample's rows for draws."""
    rows = output.n_rows
    if kind is SignalKind.topk:
        for start in range(0, rows, chunk_size):
            yield slice(start, min(start + chunk_size, rows)), None
        return
    offsets = output.row_offsets.tolist() if output.row_offsets is not None else [0, rows]
    if seeds is not None and len(seeds) != len(offsets) - 1:
        raise ValueError(f"{len(seeds)} draw seeds for {len(offsets) - 1} samples")
    for index, (first, last) in enumerate(zip(offsets, offsets[1:])):
        gen = generator
        if seeds is not None:
            gen = torch.Generator(device=output.hidden.device).manual_seed(int(seeds[index]))
        for start in range(first, last, chunk_size):
            yield slice(start, min(start + chunk_size, last)), gen


def tail_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum of the top k's probabilities) per row, from log-probabilities normalised over the
    whole vocabulary (what inference servers return); -inf where rounding leaves nothing."""
    mass = logprobs.double().exp().sum(-1)
    return torch.log1p(-mass.clamp(max=1.0)).to(logprobs.dtype)
