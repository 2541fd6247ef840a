"""The exact UTF-8 bytes each token of a fast tokenizer stands for.

Cross-tokenizer work compares tokens of two vocabularies through the bytes they spell, never
through their display strings: a byte-level BPE writes a space as ``Ġ`` and ``é`` as ``Ã©``, a
SentencePiece-style (metaspace) vocabulary writes a space as ``▁`` and falls back to ``<0xC3>``
tokens for bytes it has no piece for. :class:`TokenBytes` reads the tokenizer's own decoder and
pre-tokenizer description (the ``tokenizer.json`` of a fast tokenizer) to learn which of these
conventions applies, and turns any token id into its bytes. Two facts need care: a byte-level
token may hold part of a multi-byte character (its bytes are still exact), and a metaspace
tokenizer with a prepended space (``prepend_scheme`` first/always, Llama-2 style) starts the text
with a ``▁`` that stands for no byte of the text (the *phantom* space).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Iterator, Optional

from kdlib.errors import ModelError

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level alphabet: display character -> byte value (a bijection on 256 bytes).

    Printable bytes stand for themselves; the 68 others are shifted to code points 256 and up,
    in byte order, so that every byte has a visible, non-space character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def require_fast(tokenizer, *, model: str, row: str = "") -> None:
    """Fail with a one-line error unless ``tokenizer`` is a fast (Rust) tokenizer with offsets."""
    if getattr(tokenizer, "is_fast", False) and getattr(tokenizer, "backend_tokenizer", None) is not None:
        return
    where = f"{row}: " if row else ""
    raise ModelError(
        f"{where}the {model} tokenizer ({type(tokenizer).__name__}) is a slow tokenizer without offset "
        "mappings; cross-tokenizer alignment needs a fast tokenizer (a tokenizer.json)"
    )


def _components(spec: Optional[dict]) -> Iterator[dict]:
    """The parts of a decoder / pre-tokenizer / normalizer description, Sequence flattened."""
    if not spec:
        return
    for key in ("decoders", "pretokenizers", "normalizers"):
        if key in spec:
            for part in spec[key] or []:
                yield from _components(part)
            return
    yield spec


class TokenBytes:
    """Token id -> exact bytes, for one fast tokenizer.

    ``kind`` is ``byte_level`` (GPT-2 style alphabet), ``metaspace`` (``▁`` for a space, with or
    without ``<0xNN>`` byte fallback) or ``plain`` (token strings are the text). A plain
    tokenizer whose decoder rewrites tokens in some other way (WordPiece ``##``) has no exact
    bytes; ``exact`` is False for it and :meth:`bytes_of` refuses.
    """

    def __init__(self, tokenizer, *, model: str) -> None:
        require_fast(tokenizer, model=model)
        self.model = model
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        decoders = list(_components(spec.get("decoder")))
        pre = list(_components(spec.get("pre_tokenizer")))
        norm = list(_components(spec.get("normalizer")))
        types = {d.get("type") for d in decoders}
        self.replacement: Optional[str] = None
        for part in decoders + pre:
            if part.get("type") == "Metaspace":
                self.replacement = part.get("replacement", "▁")
        for d in decoders:
            if d.get("type") == "Replace" and d.get("content") == " ":
                self.replacement = (d.get("pattern") or {}).get("String", self.replacement)
        if "ByteLevel" in types:
            self.kind = "byte_level"
        elif self.replacement is not None:
            self.kind = "metaspace"
        else:
            self.kind = "plain"
        self.exact = not ({"WordPiece", "BPEDecoder", "CTC"} & types)
        model_spec = spec.get("model") or {}
        self.byte_fallback = bool(model_spec.get("byte_fallback")) or "ByteFallback" in types
        self.phantom_prefix = any(
            p.get("type") == "Metaspace"
            and (p.get("prepend_scheme") in ("first", "always") or p.get("add_prefix_space") is True)
            for p in pre
        ) or any(n.get("type") == "Prepend" for n in norm)
        self._tokenizer = tokenizer
        self._added = {int(i): t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self._special = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self._alphabet = byte_level_alphabet() if self.kind == "byte_level" else None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def bytes_of(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` spells (an added token spells its own content)."""
        if not self.exact:
            raise ModelError(
                f"the {self.model} tokenizer's decoder rewrites tokens (WordPiece-like); their bytes "
                "are not exact, so token ids that differ from the tokenizer's own encoding of the "
                "text cannot be aligned"
            )
        token_id = int(token_id)
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        token = self._tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            raise ModelError(f"token id {token_id} is outside the {self.model} vocabulary")
        return self.bytes_of_string(token)

    def bytes_of_string(self, token: str) -> bytes:
        """The bytes of a vocabulary string (not an added token)."""
        if self._alphabet is not None:
            try:
                return bytes(self._alphabet[c] for c in token)
            except KeyError:  # not written in the byte alphabet: a literal string
                return token.encode("utf-8")
        if self.byte_fallback:
            found = _BYTE_FALLBACK.match(token)
            if found:
                return bytes([int(found.group(1), 16)])
        if self.replacement:
            token = token.replace(self.replacement, " ")
        return token.encode("utf-8")

    def is_byte_fallback(self, token: str) -> bool:
        return self.byte_fallback and _BYTE_FALLBACK.match(token) is not None

    def text_byte_counts(self, token_ids: list[int], text: str) -> list[int]:
        """Bytes of the text each token covers, for tokens spelling ``text`` from its start.

        Equal to the token bytes, except that a phantom prefix space on the first token (a
        metaspace tokenizer prepending ``▁`` to text that does not start with a space) covers no
        byte of the text.
        """
        counts = [len(self.bytes_of(t)) for t in token_ids]
        if counts and self.has_phantom(token_ids[0], text):
            counts[0] -= 1
        return counts

    def has_phantom(self, first_token: int, text: str) -> bool:
        """Whether ``first_token``, the first token of ``text``, starts with a phantom space."""
        return (
            self.phantom_prefix
            and not text.startswith(" ")
            and int(first_token) not in self._added
            and self.bytes_of(first_token).startswith(b" ")
        )
