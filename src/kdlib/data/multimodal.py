"""Image+text dataset rows -> one typed conversation: turns of text and image parts, plus the images.

Two families of layouts are read, and the same chat gives the same :class:`VisionConversation`
whichever is used:

- OpenAI-style ``messages`` whose content is a list of parts: ``{"type": "text", "text": ...}``,
  ``{"type": "image", "image"|"path"|"url": <ref>}``, ``{"type": "image_url", "image_url":
  {"url": <ref>}}``, or a value-less ``{"type": "image"}`` that takes the next entry of the row's
  images column (the Hugging Face datasets convention). String content is text, in which the image
  placeholder (``<image>``) marks images of the images column.
- LLaVA / ShareGPT ``conversations`` (``from``/``value``) with ``<image>`` placeholders and the
  images in an ``images`` list column (or LLaVA's single ``image`` column).

The text layouts (prompt/response, Alpaca) are read as for text models, their text holding
placeholders for the images column; rows without images are plain text chats.

An image part is a slot pointing into :attr:`VisionConversation.images`; the references are opened
only later (:func:`kdlib.data.images.open_image`). Whitespace next to a placeholder is dropped, so
``"<image>\\nWhat is this?"`` is the image followed by the text ``"What is this?"``, as in the parts
layout. :meth:`VisionConversation.template_messages` renders the turns in the message form that
every VLM processor's chat template reads (content always a list of parts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from kdlib.config.schema import DataConfig, DataFormat
from kdlib.data.formats import _SHAREGPT_ROLES, _check_roles, _require, row_to_conversation
from kdlib.data.images import ImageRef, image_ref
from kdlib.errors import DataError

_IMAGE_VALUE_KEYS = ("image", "path", "url", "image_url")
_LLAVA_IMAGE_KEY = "image"


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """The ``index``-th image of the conversation (an index into ``VisionConversation.images``)."""

    index: int


Part = Union[TextPart, ImagePart]


@dataclass
class Turn:
    role: str  # system | user | assistant
    parts: list[Part]

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.parts if isinstance(part, TextPart))

    @property
    def n_images(self) -> int:
        return sum(isinstance(part, ImagePart) for part in self.parts)


@dataclass
class VisionConversation:
    """A chat whose turns may hold images; ``images[i]`` is the image of ``ImagePart(i)``."""

    turns: list[Turn]
    images: list[ImageRef] = field(default_factory=list)

    def template_messages(self) -> list[dict]:
        """The turns as chat-template messages: content is a list of text and image parts."""
        messages = []
        for turn in self.turns:
            content = [
                {"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"}
                for part in turn.parts
            ]
            messages.append({"role": turn.role, "content": content})
        return messages

    def text_messages(self, placeholder: str = "<image>") -> list[dict]:
        """The turns as plain messages (images shown as ``placeholder``), for logs and reports."""
        return [
            {"role": turn.role, "content": "".join(p.text if isinstance(p, TextPart) else placeholder for p in turn.parts)}
            for turn in self.turns
        ]

    def without_response(self) -> "VisionConversation":
        """The prompt: every turn but a final assistant turn (whose images, if any, are dropped)."""
        if not self.turns or self.turns[-1].role != "assistant":
            return self
        turns = self.turns[:-1]
        used = sum(turn.n_images for turn in turns)
        return VisionConversation(turns, self.images[:used])


def row_holds_images(row: dict[str, Any], cfg: DataConfig) -> bool:
    """Whether a row is in an image+text form: an images column, or message content given as a
    list of parts (which text models do not read)."""
    if row.get(cfg.images_key) or row.get(_LLAVA_IMAGE_KEY):
        return True
    messages = row.get(cfg.messages_key)
    return isinstance(messages, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages)


def row_to_vision_conversation(
    row: dict[str, Any], fmt: DataFormat, cfg: DataConfig, base_dir: Path, where: str
) -> VisionConversation:
    """The conversation of one row (``fmt`` from :func:`kdlib.data.formats.detect_format`);
    relative image paths are taken from ``base_dir``. The text layouts (prompt/response, Alpaca)
    hold images through placeholders in their text and the images column."""
    column = _column_images(row, cfg, base_dir, where)
    builder = _Builder(column, cfg.image_placeholder, base_dir, where)
    if fmt is DataFormat.messages:
        messages = _require(row, cfg.messages_key, where)
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: '{cfg.messages_key}' must be a non-empty list of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(f"{where}: message {i} must have 'role' and 'content'")
            builder.add_turn(str(message["role"]), message["content"], f"message {i}")
    elif fmt is DataFormat.sharegpt:
        turns = _require(row, "conversations", where)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'conversations' must be a non-empty list")
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"{where}: conversation turn {i} must have 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise DataError(f"{where}: turn {i} has unknown speaker {turn['from']!r}; known: {sorted(_SHAREGPT_ROLES)}")
            builder.add_turn(role, turn["value"], f"turn {i}")
    else:
        for i, message in enumerate(row_to_conversation(row, fmt, cfg, where)):
            builder.add_turn(message["role"], message["content"], f"message {i}")
    conversation = builder.finish()
    _check_roles([{"role": turn.role} for turn in conversation.turns], where)
    return conversation


class _Builder:
    """Collects turns and image slots of one row, taking column images in order."""

    def __init__(self, column: list[ImageRef], placeholder: str, base_dir: Path, where: str) -> None:
        self.column = column
        self.next_column: Iterator[ImageRef] = iter(column)
        self.used_column = 0
        self.placeholder = placeholder
        self.base_dir = base_dir
        self.where = where
        self.turns: list[Turn] = []
        self.images: list[ImageRef] = []

    def add_turn(self, role: str, content: Any, what: str) -> None:
        if isinstance(content, str):
            parts = self._split(content, what)
        elif isinstance(content, list):
            parts = [self._part(part, f"{what} part {j}") for j, part in enumerate(content)]
        else:
            raise DataError(f"{self.where}: {what} content must be text or a list of parts, got {type(content).__name__}")
        self.turns.append(Turn(role, [part for part in parts if part is not None]))

    def finish(self) -> VisionConversation:
        if self.used_column != len(self.column):
            raise DataError(
                f"{self.where}: the text has {self.used_column} image slots but the images column holds "
                f"{len(self.column)} images"
            )
        return VisionConversation(self.turns, self.images)

    def _part(self, part: Any, what: str) -> Optional[Part]:
        if not isinstance(part, dict) or "type" not in part:
            raise DataError(f"{self.where}: {what} must be an object with a 'type'")
        kind = part["type"]
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise DataError(f"{self.where}: {what} text must be text, got {type(text).__name__}")
            return TextPart(text) if text else None
        if kind in ("image", "image_url"):
            # image_url holds {"url": ...}, which image_ref reads like a datasets Image dict
            value = next((part[key] for key in _IMAGE_VALUE_KEYS if part.get(key) is not None), None)
            if value is None:
                return self._from_column(what)
            return self._add(image_ref(value, self.base_dir, f"{self.where}: {what}"))
        raise DataError(f"{self.where}: {what} has type {kind!r}; expected 'text', 'image' or 'image_url'")

    def _split(self, text: str, what: str) -> list[Optional[Part]]:
        pieces = text.split(self.placeholder)
        parts: list[Optional[Part]] = []
        for k, piece in enumerate(pieces):
            if k > 0:
                parts.append(self._from_column(what))
                piece = piece.lstrip()
            if k < len(pieces) - 1:
                piece = piece.rstrip()
            if piece:
                parts.append(TextPart(piece))
        return parts

    def _from_column(self, what: str) -> ImagePart:
        ref = next(self.next_column, None)
        if ref is None:
            have = f"only {len(self.column)} images in the images column" if self.column else "no images column"
            raise DataError(f"{self.where}: {what} has an image slot without an image ({have})")
        self.used_column += 1
        return self._add(ref)

    def _add(self, ref: ImageRef) -> ImagePart:
        self.images.append(ref)
        return ImagePart(len(self.images) - 1)


def _column_images(row: dict[str, Any], cfg: DataConfig, base_dir: Path, where: str) -> list[ImageRef]:
    value = row.get(cfg.images_key)
    key = cfg.images_key
    if value is None and row.get(_LLAVA_IMAGE_KEY) is not None:
        value, key = row[_LLAVA_IMAGE_KEY], _LLAVA_IMAGE_KEY
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [image_ref(v, base_dir, f"{where}: {key}[{i}]") for i, v in enumerate(values)]


def data_root(source_name: str) -> Path:
    """The directory relative image paths are read from: the data file's, or the data directory."""
    path = Path(source_name)
    if path.is_file():
        return path.parent.resolve()
    if path.is_dir():
        return path.resolve()
    return Path.cwd()
