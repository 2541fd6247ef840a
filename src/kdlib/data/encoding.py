"""Conversations -> token ids with the span of the trained response, per model.

Each model reads a conversation through its own tokenizer and chat template. The trained tokens are
those of the last assistant turn, from its first content token through the template's end-of-turn
token (``<|im_end|>``, ``<|eot_id|>``, ...), which the student must learn to emit; whatever the
template adds after that token is dropped. The prompt is the template rendered up to the assistant
header (``add_generation_prompt=True``); it must be a textual prefix of the full rendering, and the
two pieces are tokenised separately so that the token boundary sits exactly at the response start.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from kdlib.data.formats import Conversation
from kdlib.errors import DataError, first_line

# End-of-turn tokens of common chat templates, besides the tokenizer's own eos token.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class EncodedChat:
    """Token ids of prompt + response, and where the response is."""

    input_ids: list[int]
    # Index of the first response token; the prompt is input_ids[:response_start].
    response_start: int
    # The rendered text the response ids were tokenised from: the template's text after the
    # generation prompt (the content, the end-of-turn marker, anything after it). Cross-tokenizer
    # alignment places the response tokens in it by byte offsets.
    response_text: str = ""

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.response_start:]

    def __len__(self) -> int:
        return len(self.input_ids)


class TurnTokens:
    """A tokenizer's pad, eos and end-of-turn tokens, and cutting a response after its turn.

    Shared by the text and the image+text encoders; subclasses set ``tokenizer`` and
    ``end_of_turn_ids``.
    """

    tokenizer: Any
    end_of_turn_ids: set[int]

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else sorted(self.end_of_turn_ids)[0]

    @property
    def eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else sorted(self.end_of_turn_ids)[0]

    @property
    def pretrained_files(self):
        """What is saved next to the model's weights so that it loads with them (the tokenizer)."""
        return self.tokenizer

    def vocabulary_signature(self) -> tuple:
        """Equal for tokenizers with the same vocabulary."""
        vocab = self.tokenizer.get_vocab()
        return len(vocab), hash(frozenset(vocab.items()))

    def _through_end_of_turn(self, response_ids: list[int]) -> list[int]:
        for i, token in enumerate(response_ids):
            if token in self.end_of_turn_ids:
                return response_ids[: i + 1]
        return response_ids + [self.eos_id]  # templates (or raw text) that end without one


class ChatEncoder(TurnTokens):
    """Renders and tokenises conversations for one model."""

    def __init__(self, tokenizer, *, apply_chat_template: bool = True, name: str = "model") -> None:
        self.tokenizer = tokenizer
        self.apply_chat_template = apply_chat_template
        self.name = name
        if apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"the {name} tokenizer has no chat template; set {name}.chat_template or "
                "data.apply_chat_template=false"
            )
        self.end_of_turn_ids = end_of_turn_ids(tokenizer)
        if not self.end_of_turn_ids:
            raise DataError(f"the {name} tokenizer has no eos / end-of-turn token")

    def signature(self) -> tuple:
        """Equal signatures mean equal token ids for every conversation."""
        return (
            type(self.tokenizer).__name__,
            *self.vocabulary_signature(),
            self.apply_chat_template,
            getattr(self.tokenizer, "chat_template", None),
        )

    def encode_prompt(self, conversation: Conversation, where: Optional[str] = None) -> list[int]:
        """Ids of everything before the response: the generation prompt of a chat."""
        with template_errors(self.name, where):
            return self._ids(self._render_prompt(conversation))

    def encode(self, conversation: Conversation, where: str) -> Optional[EncodedChat]:
        """Prompt + last assistant turn; None when the response is empty (caller counts it)."""
        if not conversation or conversation[-1]["role"] != "assistant":
            raise DataError(f"{where}: the conversation must end with an assistant message to train on")
        if not conversation[-1]["content"].strip():
            return None
        with template_errors(self.name, where):
            prompt_text = self._render_prompt(conversation[:-1])
            full_text = self._render_full(conversation)
        if not full_text.startswith(prompt_text):
            raise DataError(
                f"{where}: the {self.name} chat template does not render the prompt as a prefix of "
                "the whole conversation, so the response tokens cannot be located"
            )
        prompt_ids = self._ids(prompt_text)
        response_text = full_text[len(prompt_text):]
        response_ids = self._through_end_of_turn(self._ids(response_text))
        return EncodedChat(input_ids=prompt_ids + response_ids, response_start=len(prompt_ids), response_text=response_text)

    @functools.cached_property
    def end_of_turn_id(self) -> int:
        """The token that ends an assistant turn in this template (``<|im_end|>``, ``<|eot_id|>``,
        ...): the last trained token of a probe conversation."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        encoded = self.encode(probe, "the end-of-turn probe")
        return encoded.response_ids[-1]

    def _render_prompt(self, conversation: Conversation) -> str:
        if self.apply_chat_template:
            return self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
        bos = self.tokenizer.bos_token or ""
        return bos + "".join(m["content"] + "\n" for m in conversation)

    def _render_full(self, conversation: Conversation) -> str:
        if self.apply_chat_template:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return self._render_prompt(conversation[:-1]) + conversation[-1]["content"]

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@contextmanager
def template_errors(name: str, where: Optional[str]) -> Iterator[None]:
    """A chat template that cannot render (a syntax error, its own ``raise_exception``, a name it
    does not define) fails as a DataError naming the model and, when known, the row."""
    import jinja2

    try:
        yield
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"the {name} chat template has a syntax error (line {exc.lineno}: {exc.message})") from None
    except jinja2.TemplateError as exc:
        prefix = f"{where}: " if where else ""
        raise DataError(f"{prefix}the {name} chat template fails on this conversation: {first_line(exc)}") from None


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn for this tokenizer: its eos, and the known end-of-turn
    tokens it treats as special (named, like eos, or added as special control tokens, as Gemma's
    ``<end_of_turn>`` is)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for token in _END_OF_TURN_TOKENS:
        if token not in vocab:
            continue
        token_id = int(vocab[token])
        if token in (tokenizer.all_special_tokens or []) or getattr(added.get(token_id), "special", False):
            ids.add(token_id)
    return ids
