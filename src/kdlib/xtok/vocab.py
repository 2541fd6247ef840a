"""The matched sub-vocabulary of two tokenizers: token pairs that spell the same bytes.

Two vocabularies share many tokens under different spellings (``Ġthe`` in a byte-level BPE is
``▁the`` in a metaspace one; ``Ã©`` is ``é``; a ``<0xC3>`` fallback token is the byte-level
``Ã``). Comparing the tokens' exact bytes (:mod:`kdlib.xtok.token_bytes`) matches all of them
without string heuristics. Special tokens are matched among themselves: by equal content first
(``<|im_end|>`` on both sides), then by role (end of sequence, beginning, padding, unknown), so an
end-of-turn token matches the other side's end-of-turn token. The match is one-to-one: when one
vocabulary spells the same bytes twice (a piece and its byte-fallback twin), the regular token
with the lowest id is kept.

KDFlow matches by replacing ``Ġ`` with ``▁`` in the token strings, which misses every token with
a non-ASCII character; TRL's GOLD matches raw strings, which misses every token with a space.

The match also records, for every teacher token, the student token its text starts with
(:attr:`VocabMatch.teacher_prefix`): the matched student token when there is one, else the first
token of the student tokenizer's encoding of its text (or the longest student token spelling a
prefix of its bytes). ``marginal`` KD
(:mod:`kdlib.xtok.marginal`) moves the teacher's probability of each token onto that student token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kdlib.xtok.token_bytes import TokenBytes

_ROLES = ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id")


@dataclass(frozen=True)
class VocabMatch:
    """Matched pairs (student id, teacher id), sorted by student id, as index tensors."""

    # [M] student token ids; student_ids[k] and teacher_ids[k] spell the same bytes.
    student_ids: torch.Tensor
    # [M] teacher token ids.
    teacher_ids: torch.Tensor
    # Entries of each tokenizer (len(tokenizer)), the denominators of matched fractions.
    student_vocab_size: int
    teacher_vocab_size: int
    # [teacher vocabulary] long: the student token each teacher token's text starts with (see
    # prefix_tokens); -1 for a teacher special token without a match. None when the match was
    # built without tokenizers (tests).
    teacher_prefix: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        return int(self.student_ids.shape[0])

    @property
    def matched_fraction(self) -> float:
        """Share of the teacher's vocabulary that is matched (GOLD's default hybrid weight)."""
        return self.size / max(self.teacher_vocab_size, 1)

    def teacher_to_student(self, teacher_rows: Optional[int] = None) -> torch.Tensor:
        """[teacher_rows] long: the matched student id of each teacher id, -1 where unmatched."""
        rows = teacher_rows or self.teacher_vocab_size
        out = torch.full((rows,), -1, dtype=torch.long, device=self.student_ids.device)
        keep = self.teacher_ids < rows
        out[self.teacher_ids[keep]] = self.student_ids[keep]
        return out

    def unmatched(self, side: str, rows: int) -> torch.Tensor:
        """Ids in [0, rows) of ``side`` ("student" or "teacher") outside the match (head padding included)."""
        ids = self.student_ids if side == "student" else self.teacher_ids
        mask = torch.ones(rows, dtype=torch.bool, device=ids.device)
        mask[ids[ids < rows]] = False
        return mask.nonzero().squeeze(-1)

    def to(self, device: torch.device | str) -> "VocabMatch":
        return VocabMatch(
            self.student_ids.to(device), self.teacher_ids.to(device), self.student_vocab_size,
            self.teacher_vocab_size, None if self.teacher_prefix is None else self.teacher_prefix.to(device),
        )


def vocabulary_bytes(tokenizer, token_bytes: TokenBytes) -> tuple[dict[bytes, int], dict[str, int]]:
    """(bytes -> id of the regular tokens, content -> id of the special tokens) of one tokenizer.

    When several regular tokens spell the same bytes, the lowest id that is not a byte-fallback
    token wins.
    """
    regular: dict[bytes, tuple[int, int]] = {}
    special: dict[str, int] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_bytes.is_special(token_id):
            special[token] = token_id
            continue
        key = token_bytes.bytes_of(token_id)
        rank = (int(token_bytes.is_byte_fallback(token)), token_id)
        if key not in regular or rank < regular[key]:
            regular[key] = rank
    return {key: rank[1] for key, rank in regular.items()}, special


def match_vocabularies(student_tokenizer, teacher_tokenizer) -> VocabMatch:
    """The matched sub-vocabulary of ``student_tokenizer`` and ``teacher_tokenizer``."""
    s_bytes = TokenBytes(student_tokenizer, model="student")
    t_bytes = TokenBytes(teacher_tokenizer, model="teacher")
    s_regular, s_special = vocabulary_bytes(student_tokenizer, s_bytes)
    t_regular, t_special = vocabulary_bytes(teacher_tokenizer, t_bytes)
    pairs = {s_id: t_regular[key] for key, s_id in s_regular.items() if key in t_regular}
    pairs.update(special_pairs(student_tokenizer, s_special, teacher_tokenizer, t_special))
    student_ids = sorted(pairs)
    return VocabMatch(
        student_ids=torch.tensor(student_ids, dtype=torch.long),
        teacher_ids=torch.tensor([pairs[s] for s in student_ids], dtype=torch.long),
        student_vocab_size=len(student_tokenizer),
        teacher_vocab_size=len(teacher_tokenizer),
        teacher_prefix=prefix_tokens(pairs, student_tokenizer, s_bytes, s_regular, teacher_tokenizer, t_bytes),
    )


def prefix_tokens(
    pairs: dict[int, int], student_tokenizer, student_bytes: TokenBytes, student_regular: dict[bytes, int],
    teacher_tokenizer, teacher_bytes: TokenBytes,
) -> torch.Tensor:
    """[len(teacher_tokenizer)] long: the student token each teacher token's text starts with.

    Per teacher id: its matched student id (``pairs``: student id -> teacher id); else the first
    token of the student tokenizer's own encoding of the token's text, when that token spells a
    prefix of the teacher token's bytes; else the longest student token spelling such a prefix (a
    token holding part of a multi-byte character, a phantom space); else -1 (a special token
    without a match).
    """
    prefix = torch.full((len(teacher_tokenizer),), -1, dtype=torch.long)
    matched = {t_id: s_id for s_id, t_id in pairs.items()}
    spelled: dict[int, bytes] = {}
    for token_id in teacher_tokenizer.get_vocab().values():
        if token_id in matched:
            prefix[token_id] = matched[token_id]
        elif not teacher_bytes.is_special(token_id):
            spelled[token_id] = teacher_bytes.bytes_of(token_id)
    texts: dict[int, str] = {}
    for token_id, token_bytes in spelled.items():
        text = _utf8_or_none(token_bytes)
        if text is not None:
            texts[token_id] = text
    order = list(texts)
    encoded = student_tokenizer([texts[t] for t in order], add_special_tokens=False)["input_ids"] if order else []
    first = {t_id: ids[0] for t_id, ids in zip(order, encoded) if ids}
    longest = max(map(len, student_regular), default=0)
    for token_id, token_bytes in spelled.items():
        if token_id in first and token_bytes.startswith(student_bytes.bytes_of(first[token_id])):
            prefix[token_id] = first[token_id]
            continue
        for end in range(min(len(token_bytes), longest), 0, -1):
            found = student_regular.get(token_bytes[:end])
            if found is not None:
                prefix[token_id] = found
                break
    return prefix


def _utf8_or_none(data: bytes) -> Optional[str]:
    """``data`` decoded, or None for bytes that are not whole UTF-8 characters (part of one)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def special_pairs(
    new_tokenizer, new_special: dict[str, int], old_tokenizer, old_special: dict[str, int]
) -> dict[int, int]:
    """new special id -> old special id: by equal content, then by role (eos, bos, pad, unk)."""
    pairs = {new_id: old_special[content] for content, new_id in new_special.items() if content in old_special}
    taken = set(pairs.values())
    new_ids, old_ids = set(new_special.values()), set(old_special.values())
    for role in _ROLES:
        new_id, old_id = getattr(new_tokenizer, role, None), getattr(old_tokenizer, role, None)
        if new_id not in new_ids or old_id not in old_ids or new_id in pairs or old_id in taken:
            continue
        pairs[int(new_id)] = int(old_id)
        taken.add(int(old_id))
    return pairs
