"""One model's response tokens and the exact bytes of the response text each one covers.

The alignment compares two tokenisations of the same response text by byte positions, so each side
first needs, for every trained response token, where it ends in the UTF-8 bytes of that text. A
fast tokenizer reports character offsets; this module turns them into byte ends. Three things need
care: several tokens can share one character (byte-level BPE splits an emoji into pieces, byte
fallback spells an unknown character as ``<0xNN>`` tokens, a phantom ``▁`` shares the offsets of
the character after it), where the token bytes (:mod:`kdlib.xtok.token_bytes`) split the
character exactly; a tokenizer may leave bytes outside every token's offsets (trimmed spaces),
which then belong to the token that follows them (or the last token); and token ids that are not
the tokenizer's own encoding of the text (a sampled on-policy response, a cut inside a word)
are spelled from their token bytes and checked against the text. Whatever cannot be made exact
is a one-line :class:`~kdlib.errors.DataError` naming the model and the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Collection, Optional

from kdlib.errors import DataError
from kdlib.xtok.token_bytes import TokenBytes, require_fast


@dataclass(frozen=True)
class ResponseTokens:
    """A response as one model trains on it: token ids, and the text bytes each text token covers.

    Text token i covers bytes ``[ends[i - 1], ends[i])`` of ``text`` (``ends[-1]`` = 0). The
    end-of-turn token, when kept, is the last id and covers no text byte.
    """

    # The trained response token ids: text tokens, then the end-of-turn token if kept.
    ids: tuple[int, ...]
    # Byte end in ``text`` (UTF-8) of each text token; non-decreasing.
    ends: tuple[int, ...]
    # The response text before the end-of-turn token, whole even when ``ids`` are cut short.
    text: str
    # Whether ``ids`` end with the end-of-turn token.
    end_of_turn: bool

    @property
    def n_text_tokens(self) -> int:
        return len(self.ends)

    @property
    def covered_bytes(self) -> int:
        """Bytes of ``text`` covered by the kept text tokens (all of it unless truncated)."""
        return self.ends[-1] if self.ends else 0

    @property
    def text_bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    @property
    def truncated(self) -> bool:
        """Whether the kept tokens stop before the end of the text."""
        return self.covered_bytes < self.text_bytes


def response_tokens(
    tokenizer,
    ids: list[int],
    *,
    end_of_turn_ids: Collection[int],
    text: Optional[str] = None,
    model: str,
    row: str,
    token_bytes: Optional[TokenBytes] = None,
) -> ResponseTokens:
    """The byte layout of response ``ids`` (as trained; possibly cut by ``data.max_len``).

    ``text`` is the rendered response piece the ids were tokenised from (the chat template's text
    after the generation prompt: the content, the end-of-turn marker, anything after it); when it
    is None (on-policy samples) the ids are decoded. The response text is the part before the
    first end-of-turn token. ``model`` and ``row`` name the tokenizer and the dataset row in errors.
    """
    require_fast(tokenizer, model=model, row=row)
    token_bytes = token_bytes or TokenBytes(tokenizer, model=model)
    eot = set(int(t) for t in end_of_turn_ids)
    ids = [int(t) for t in ids]
    cut = next((k for k, t in enumerate(ids) if t in eot), len(ids))
    if cut < len(ids) - 1:
        raise DataError(f"{row}: the {model} response has tokens after its end-of-turn token")
    text_ids = ids[:cut]
    if text is None:
        text = tokenizer.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    enc_ids = list(encoding["input_ids"])
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    enc_cut = next((k for k, t in enumerate(enc_ids) if t in eot), len(enc_ids))
    if enc_cut < len(enc_ids):  # the rendered piece goes on after the response text
        text = text[: offsets[enc_cut][0]]
    enc_ids, offsets = enc_ids[:enc_cut], offsets[:enc_cut]
    if enc_ids[: len(text_ids)] == text_ids:
        ends = byte_ends(text, offsets, enc_ids, token_bytes, model=model, row=row)[: len(text_ids)]
    else:
        ends = _ends_from_token_bytes(text, text_ids, token_bytes, model=model, row=row)
    return ResponseTokens(ids=tuple(ids), ends=tuple(ends), text=text, end_of_turn=cut < len(ids))


def byte_ends(
    text: str,
    offsets: list[tuple[int, int]],
    token_ids: list[int],
    token_bytes: TokenBytes,
    *,
    model: str,
    row: str,
) -> list[int]:
    """Byte end of each token of a tokenizer's encoding of ``text``, from its character offsets.

    Tokens whose character spans overlap form a run (pieces of one character, byte fallback, a
    phantom space); the run's bytes are split by the tokens' byte counts, which must add up to
    the run's bytes exactly. Bytes not under any token go to the next token (the last one at the
    end of the text).
    """
    char_to_byte = [0, *accumulate(len(c.encode("utf-8")) for c in text)]
    n = len(offsets)
    ends: list[int] = []
    position = 0
    i = 0
    while i < n:
        j = i
        run_end = offsets[i][1]
        while j + 1 < n and offsets[j + 1][0] < run_end:
            j += 1
            run_end = max(run_end, offsets[j][1])
        target = char_to_byte[run_end]
        if j == i:
            ends.append(max(target, position))
        else:
            counts = [len(token_bytes.bytes_of(t)) for t in token_ids[i : j + 1]]
            if i == 0 and token_bytes.has_phantom(token_ids[0], text):
                counts[0] -= 1
            if position + sum(counts) != target:
                raise DataError(
                    f"{row}: the {model} tokens {i}..{j} cover {target - position} bytes of the "
                    f"response text but spell {sum(counts)}; cannot place them exactly"
                )
            ends.extend(position + c for c in accumulate(counts))
        position = ends[-1]
        i = j + 1
    total = char_to_byte[-1]
    if ends and ends[-1] < total:
        ends[-1] = total  # trailing bytes outside every token's offsets (trimmed spaces)
    return ends


def _ends_from_token_bytes(
    text: str, token_ids: list[int], token_bytes: TokenBytes, *, model: str, row: str
) -> list[int]:
    """Byte ends of ids that are not the tokenizer's encoding of ``text``, from their token bytes."""
    data = text.encode("utf-8")
    counts = token_bytes.text_byte_counts(token_ids, text)
    ends = list(accumulate(counts))
    spelled = b"".join(token_bytes.bytes_of(t) for t in token_ids)
    if token_ids and token_bytes.has_phantom(token_ids[0], text):
        spelled = spelled[1:]
    if not data.startswith(spelled):
        mismatch = next((k for k, (a, b) in enumerate(zip(spelled, data)) if a != b), min(len(spelled), len(data)))
        raise DataError(
            f"{row}: the {model} response token ids do not spell the response text "
            f"(first difference at byte {mismatch})"
        )
    return ends
