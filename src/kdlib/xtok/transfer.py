"""Vocabulary transfer: give a model a new tokenizer, initialising each new token from its old rows.

A student distilled into another vocabulary (smaller, for edge deployment, or another family's)
starts from the teacher's weights, whose embedding and head rows belong to the teacher's
vocabulary. Fast Vocabulary Transfer (Gee et al. 2022) initialises each new token's row from the
old tokenizer's view of the same text: a new token spelling the same bytes as an old token copies
its row; any other is the mean of the rows of the old tokens its text tokenises into (a byte string
that is not valid UTF-8 on its own, a byte-fallback piece, uses the old tokens of its single
bytes). Special tokens map by content, then by role (eos, bos, pad, unk); a special token with no
counterpart, or a token the old vocabulary cannot spell, gets the mean of all old rows. Both the
input embedding and the output head are transferred (one matrix when they are tied), and the
model's config (vocab_size, special token ids) follows the new tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdlib.xtok.token_bytes import TokenBytes
from kdlib.xtok.vocab import special_pairs, vocabulary_bytes


@dataclass
class TransferReport:
    """How the rows of the new vocabulary were initialised."""

    # New tokens spelling the same bytes as one old token (row copied).
    copied: int = 0
    # New tokens initialised as the mean of several old tokens' rows.
    averaged: int = 0
    # Special tokens mapped by content or role.
    special: int = 0
    # Tokens with no old counterpart (mean of all old rows).
    fallback: int = 0

    @property
    def total(self) -> int:
        return self.copied + self.averaged + self.special + self.fallback


def transfer_plan(old_tokenizer, new_tokenizer) -> tuple[list[list[int]], TransferReport]:
    """For each new token id, the old token ids whose rows it averages ([] = mean of all rows)."""
    old_bytes = TokenBytes(old_tokenizer, model="old")
    new_bytes = TokenBytes(new_tokenizer, model="new")
    old_regular, old_special = vocabulary_bytes(old_tokenizer, old_bytes)
    new_vocab = {token_id: token for token, token_id in new_tokenizer.get_vocab().items()}
    new_special = {new_vocab[i]: i for i in new_vocab if new_bytes.is_special(i)}
    specials = special_pairs(new_tokenizer, new_special, old_tokenizer, old_special)
    report = TransferReport()
    plan: list[list[int]] = []
    for new_id in range(len(new_tokenizer)):
        if new_id in specials:
            plan.append([specials[new_id]])
            report.special += 1
            continue
        if new_id not in new_vocab or new_bytes.is_special(new_id):
            plan.append([])
            report.fallback += 1
            continue
        data = new_bytes.bytes_of(new_id)
        if data in old_regular:
            plan.append([old_regular[data]])
            report.copied += 1
            continue
        old_ids = _spell(data, old_tokenizer, old_regular)
        plan.append(old_ids)
        if old_ids:
            report.averaged += 1
        else:
            report.fallback += 1
    return plan, report


def _spell(data: bytes, old_tokenizer, old_regular: dict[bytes, int]) -> list[int]:
    """Old token ids spelling ``data``: its text's tokenisation, else one old token per byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text:
        ids = list(old_tokenizer(text, add_special_tokens=False)["input_ids"])
        if ids:
            return ids
    per_byte = [old_regular.get(bytes([b])) for b in data]
    return [] if None in per_byte else per_byte


def _mean_rows(old: torch.Tensor, plan: list[list[int]], real_rows: int) -> torch.Tensor:
    """[len(plan), H]: the mean of ``old`` rows per plan entry, in float64, then old's dtype."""
    source = old.detach().double()
    overall = source[:real_rows].mean(0)
    rows = [source[ids].mean(0) if ids else overall for ids in plan]
    return torch.stack(rows).to(old.dtype)


@torch.no_grad()
def transfer_vocabulary(model: nn.Module, old_tokenizer, new_tokenizer) -> TransferReport:
    """Replace ``model``'s vocabulary (embedding and head, in place) by ``new_tokenizer``'s."""
    plan, report = transfer_plan(old_tokenizer, new_tokenizer)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    real_rows = min(len(old_tokenizer), embedding.weight.shape[0])
    new_embedding = _mean_rows(embedding.weight, plan, real_rows)
    new_head = None if head is None or tied else _mean_rows(head.weight, plan, real_rows)
    new_bias = None
    if head is not None and getattr(head, "bias", None) is not None:
        new_bias = _mean_rows(head.bias.unsqueeze(-1), plan, real_rows).squeeze(-1)
    model.resize_token_embeddings(len(plan), mean_resizing=False)
    model.get_input_embeddings().weight.copy_(new_embedding)
    if new_head is not None:
        model.get_output_embeddings().weight.copy_(new_head)
    if new_bias is not None:
        model.get_output_embeddings().bias.copy_(new_bias)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if hasattr(config, role):
                setattr(config, role, getattr(new_tokenizer, role, None))
    return report
