"""Dataset row layouts -> one conversation type.

kdlib reads OpenAI-style ``messages``, prompt/response pairs, Alpaca (instruction/input/output) and
ShareGPT (``conversations`` with from/value). Every row becomes a list of ``{"role", "content"}``
messages with roles system/user/assistant, checked here so that a bad row is reported with its file
and row number instead of failing inside a tokenizer.
"""

from __future__ import annotations

from typing import Any, Callable

from kdlib.config.schema import DataConfig, DataFormat
from kdlib.errors import DataError

Message = dict[str, str]
Conversation = list[Message]

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


def detect_format(columns: list[str], cfg: DataConfig, where: str) -> DataFormat:
    """The row layout: ``cfg.format`` unless it is auto, else guessed from the column names."""
    if cfg.format is not DataFormat.auto:
        return cfg.format
    if cfg.messages_key in columns:
        return DataFormat.messages
    if "conversations" in columns:
        return DataFormat.sharegpt
    if "instruction" in columns and "output" in columns:
        return DataFormat.alpaca
    if cfg.prompt_key in columns:
        return DataFormat.prompt_response
    raise DataError(
        f"{where}: cannot tell the data format from columns {sorted(columns)}; expected "
        f"'{cfg.messages_key}' (messages), 'conversations' (sharegpt), 'instruction'+'output' "
        f"(alpaca) or '{cfg.prompt_key}'+'{cfg.response_key}'; set data.format and the data.*_key options"
    )


def row_to_conversation(row: dict[str, Any], fmt: DataFormat, cfg: DataConfig, where: str) -> Conversation:
    """The conversation of one row; ``where`` names the file and row in errors."""
    converter: Callable[[dict[str, Any], DataConfig, str], Conversation] = _CONVERTERS[fmt]
    conversation = converter(row, cfg, where)
    _check_roles(conversation, where)
    return conversation


def _from_messages(row: dict[str, Any], cfg: DataConfig, where: str) -> Conversation:
    messages = _require(row, cfg.messages_key, where)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{cfg.messages_key}' must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} must have 'role' and 'content'")
        out.append({"role": str(message["role"]), "content": _text(message["content"], where, f"message {i}")})
    return out


def _from_prompt_response(row: dict[str, Any], cfg: DataConfig, where: str) -> Conversation:
    prompt = _require(row, cfg.prompt_key, where)
    conversation: Conversation
    if isinstance(prompt, list):  # a prompt given as chat messages
        conversation = _from_messages({"messages": prompt}, DataConfig(train="", messages_key="messages"), where)
    else:
        conversation = [{"role": "user", "content": _text(prompt, where, cfg.prompt_key)}]
    if cfg.response_key in row and row[cfg.response_key] is not None:
        conversation.append(
            {"role": "assistant", "content": _text(row[cfg.response_key], where, cfg.response_key)}
        )
    return conversation


def _from_alpaca(row: dict[str, Any], cfg: DataConfig, where: str) -> Conversation:
    instruction = _text(_require(row, "instruction", where), where, "instruction")
    extra = row.get("input") or ""
    user = f"{instruction}\n\n{_text(extra, where, 'input')}" if str(extra).strip() else instruction
    conversation: Conversation = []
    if row.get("system"):
        conversation.append({"role": "system", "content": _text(row["system"], where, "system")})
    conversation.append({"role": "user", "content": user})
    if row.get("output") is not None:
        conversation.append({"role": "assistant", "content": _text(row["output"], where, "output")})
    return conversation


def _from_sharegpt(row: dict[str, Any], cfg: DataConfig, where: str) -> Conversation:
    turns = _require(row, "conversations", where)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversation turn {i} must have 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(
                f"{where}: turn {i} has unknown speaker {turn['from']!r}; known: {sorted(_SHAREGPT_ROLES)}"
            )
        out.append({"role": role, "content": _text(turn["value"], where, f"turn {i}")})
    return out


_CONVERTERS = {
    DataFormat.messages: _from_messages,
    DataFormat.prompt_response: _from_prompt_response,
    DataFormat.alpaca: _from_alpaca,
    DataFormat.sharegpt: _from_sharegpt,
}


def _require(row: dict[str, Any], key: str, where: str) -> Any:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing key {key!r} (row has {sorted(k for k in row if row[k] is not None)})")
    return row[key]


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be text, got {type(value).__name__}")
    return value


def _check_roles(conversation: Conversation, where: str) -> None:
    for i, message in enumerate(conversation):
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {message['role']!r}; expected one of {ROLES}")
        if message["role"] == "system" and i != 0:
            raise DataError(f"{where}: a system message may only come first (message {i})")


def privileged_conversation(row: dict[str, Any], conversation: Conversation, key: str, where: str) -> Conversation:
    """The teacher's version of ``conversation`` for privileged-context distillation.

    ``row[key]`` is either text, which replaces the content of the last user message (a hint, a
    worked example, the answer key), or a list of messages, which replaces the whole prompt. The
    last assistant turn, if any, is kept: teacher and student score the same response.
    """
    value = _require(row, key, where)
    response = conversation[-1:] if conversation[-1]["role"] == "assistant" else []
    prompt = conversation[: len(conversation) - len(response)]
    if isinstance(value, str):
        users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
        if not users:
            raise DataError(f"{where}: no user message for the teacher's {key!r} to replace")
        prompt = [dict(m) for m in prompt]
        prompt[users[-1]]["content"] = value
    elif isinstance(value, list):
        prompt = _from_messages({"messages": value}, DataConfig(train="", messages_key="messages"), where)
    else:
        raise DataError(f"{where}: {key!r} must be text or a list of messages, got {type(value).__name__}")
    teacher = prompt + response
    _check_roles(teacher, where)
    return teacher
