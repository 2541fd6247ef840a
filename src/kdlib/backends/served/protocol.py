"""What kdlib sends to ``/v1/completions`` and how it reads the prompt's top-k log-probabilities back.

The request scores token-id prompts without generating: ``echo=true`` returns the prompt's own
log-probabilities, ``logprobs=k`` the k most probable tokens at each position, ``max_tokens=1``
(the smallest every server accepts: one refuses 0) and ``temperature=1``, ``top_p=1`` so nothing
reshapes the distribution. In echo mode, entry t of ``choices[i].logprobs.top_logprobs`` is the
distribution *for* prompt token t, computed at position t - 1 (entry 0 is null); the one generated
token adds entry n. kdlib's loss position t predicts token t + 1, so its top-k is entry t + 1.

An entry is a JSON object from token to log-probability, keyed by strings. With ``token_keys=ids``
the keys are ``"token_id:<id>"`` (``return_tokens_as_token_ids``); with ``token_keys=text`` they are
each token's text, mapped back to ids by :class:`TextKeys`. A text that several ids produce cannot
be mapped: with text keys kdlib asks for ``extra`` more tokens than k and keeps the k most probable
whose text names one id, so a token with an ambiguous text is never in the top-k and its probability
counts in the tail bucket (a top-k of the vocabulary without those ids). A server may also list one
more token than asked (the prompt's own token when it is not among the top k): entries are ranked by
log-probability before the first k are kept. Anything else (a missing field, a short entry, another
number of choices or positions) is a :class:`ProtocolError` naming what differed.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from kdlib.backends.served.options import TokenKeys

ID_PREFIX = "token_id:"


class ProtocolError(ValueError):
    """The server answered, but not what the protocol says (the client names the URL)."""


def completion_request(model: str, prompts: Sequence[Sequence[int]], k: int, keys: TokenKeys,
                       extra: int = 0) -> dict[str, Any]:
    """The JSON body of one request scoring ``prompts`` (token ids); ``extra`` more tokens than k
    per position with text keys."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": [list(p) for p in prompts],
        "echo": True,
        "logprobs": k + (extra if keys is TokenKeys.text else 0),
        "max_tokens": 1,
        "temperature": 1.0,
        "top_p": 1.0,
        "n": 1,
        "stream": False,
    }
    if keys is TokenKeys.ids:
        body["return_tokens_as_token_ids"] = True
    return body


class TextKeys:
    """Token text -> id for a tokenizer, the way a server without id keys writes its keys: each
    id decoded alone, and a decoded text holding U+FFFD whose raw bytes are not valid UTF-8 (a
    fragment of a multi-byte character) written as those bytes read as latin-1. Texts that several
    ids produce are kept apart (``ambiguous``)."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        vocab = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(vocab)])
        self.ids: dict[str, int] = {}
        self.ambiguous: dict[str, list[int]] = {}
        for token_id, text in enumerate(texts):
            if "\ufffd" in text:
                text = _fragment_text(tokenizer.convert_ids_to_tokens(token_id), byte_of) or text
            if text in self.ambiguous:
                self.ambiguous[text].append(token_id)
            elif text in self.ids:
                self.ambiguous[text] = [self.ids.pop(text), token_id]
            else:
                self.ids[text] = token_id

    def id_of(self, key: str) -> int | None:
        """The id whose text ``key`` is; None when several ids have that text."""
        if key in self.ids:
            return self.ids[key]
        if key in self.ambiguous:
            return None
        raise ProtocolError(f"top_logprobs key {key!r} is not the text of any token of the teacher's tokenizer "
                            "(does the server serve another tokenizer?)")


def _fragment_text(piece: Any, byte_of: dict[str, int]) -> str | None:
    """The latin-1 rendering of a byte-level piece whose bytes are not valid UTF-8, else None."""
    if not piece or any(char not in byte_of for char in piece):
        return None
    raw = bytes(byte_of[char] for char in piece)
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _id_key(key: str) -> int:
    if not key.startswith(ID_PREFIX) or not key[len(ID_PREFIX):].isdigit():
        raise ProtocolError(f"top_logprobs key {key!r} is not 'token_id:<id>': the server ignores "
                            "return_tokens_as_token_ids; set teacher.backend.token_keys=text")
    return int(key[len(ID_PREFIX):])


def choice_logprobs(response: Any, n_prompts: int) -> list[list]:
    """Each prompt's ``top_logprobs`` list, in prompt order, from a parsed response body."""
    if not isinstance(response, dict) or not isinstance(response.get("choices"), list):
        raise ProtocolError("the response has no 'choices' list")
    choices = response["choices"]
    if len(choices) != n_prompts:
        raise ProtocolError(f"the response has {len(choices)} choices for {n_prompts} prompts")
    try:
        ordered = sorted(choices, key=lambda c: c["index"])
        tables = [c["logprobs"]["top_logprobs"] for c in ordered]
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"a choice has no index or logprobs.top_logprobs ({type(exc).__name__}: {exc})") from None
    if [c["index"] for c in ordered] != list(range(n_prompts)):
        raise ProtocolError(f"the choices' indices are {[c['index'] for c in ordered]}, not 0..{n_prompts - 1}")
    return tables


def topk_at(table: Any, n_tokens: int, positions: Sequence[int], k: int, keys: TokenKeys,
            text_keys: TextKeys | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``([rows, k] ids, [rows, k] float32 log-probs, entries skipped)`` of the distributions
    predicted at ``positions`` of a prompt of ``n_tokens`` tokens (entries ``position + 1`` of
    ``table``); skipped: tokens left out because their text names several ids."""
    if not isinstance(table, list) or len(table) < n_tokens + 1:
        size = len(table) if isinstance(table, list) else type(table).__name__
        raise ProtocolError(f"top_logprobs has {size} entries for a {n_tokens}-token prompt "
                            f"and one generated token (expected {n_tokens + 1}: echo with max_tokens=1)")
    ids = torch.empty(len(positions), k, dtype=torch.long)
    values = torch.empty(len(positions), k, dtype=torch.float32)
    skipped = 0
    for row, position in enumerate(positions):
        entry = table[position + 1]
        if not isinstance(entry, dict) or len(entry) < k:
            got = len(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ProtocolError(f"top_logprobs entry {position + 1} has {got} tokens, fewer than logprobs={k}")
        ranked = sorted(entry.items(), key=lambda item: -float(item[1]))
        if keys is TokenKeys.ids:
            named = [(_id_key(key), value) for key, value in ranked[:k]]
        else:
            named = []
            for key, value in ranked:  # the k most probable whose text names one id
                token = text_keys.id_of(key)
                skipped += token is None
                if token is not None:
                    named.append((token, value))
                if len(named) == k:
                    break
            if len(named) < k:
                raise ProtocolError(f"top_logprobs entry {position + 1}: {len(named)} of its {len(entry)} tokens have a "
                                    f"text that names one token id, fewer than k={k} (raise teacher.backend.extra_logprobs)")
        ids[row] = torch.tensor([i for i, _ in named], dtype=torch.long)
        values[row] = torch.tensor([float(v) for _, v in named], dtype=torch.float32)
    return ids, values, skipped
