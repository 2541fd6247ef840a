"""Where a run's samples come from and how rows become conversations and token sequences."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from omegaconf import MISSING

from kdlib.config.node import ConfigNode


class DataFormat(str, Enum):
    """Layout of a dataset row."""

    auto = "auto"  # detected from the dataset's columns
    messages = "messages"  # OpenAI chat: [{"role": ..., "content": ...}, ...]
    prompt_response = "prompt_response"  # two text columns (data.prompt_key, data.response_key)
    alpaca = "alpaca"  # instruction / input / output
    sharegpt = "sharegpt"  # conversations: [{"from": "human"|"gpt"|"system", "value": ...}]


class Overlong(str, Enum):
    """What happens to a sample longer than ``data.max_len`` tokens."""

    truncate = "truncate"  # cut the response (never the prompt) to fit; counted in the log
    drop = "drop"  # leave the sample out; counted in the log


class Unalignable(str, Enum):
    """What happens to a sample whose response cannot be aligned across two tokenizers (its text
    differs between the two renderings, or tokens that cannot be placed in it exactly)."""

    error = "error"  # stop with a one-line error naming the row and the model
    drop = "drop"  # leave the sample out; counted in the log and data_report.json


class BadImages(str, Enum):
    """What happens to a row whose image is missing, unreadable, too large or remote."""

    error = "error"  # stop with a one-line error naming the data file, row and image
    drop = "drop"  # leave the row out; counted by cause in the filter report


@dataclass
class DataConfig(ConfigNode):
    """Where samples come from and how they become token batches."""

    # Training data: a .jsonl/.json/.parquet file, a saved dataset directory, a hub dataset name,
    # or pkg://<package>/<file>.
    train: str = MISSING
    # Held-out data for evaluation (same forms as `train`); null skips evaluation.
    eval: Optional[str] = None
    # Split names used for hub datasets and saved DatasetDicts.
    train_split: str = "train"
    eval_split: str = "train"
    # Row layout; auto detects it from the columns.
    format: DataFormat = DataFormat.auto
    # Column names for the formats that need them.
    messages_key: str = "messages"
    prompt_key: str = "prompt"
    response_key: str = "response"
    # Longest sample in tokens (prompt + response).
    max_len: int = 1024
    # What to do with longer samples.
    overlong: Overlong = Overlong.truncate
    # Cross-tokenizer algorithms: what to do with a sample whose response cannot be aligned
    # between the two tokenizers.
    unalignable: Unalignable = Unalignable.error
    # Use at most this many training rows (null = all).
    max_samples: Optional[int] = None
    # Use at most this many evaluation rows (null = all).
    eval_max_samples: Optional[int] = None
    # Shuffle training samples every epoch (seeded).
    shuffle: bool = True
    # Render conversations with each model's chat template; false joins the turns with newlines.
    apply_chat_template: bool = True
    # Privileged context: the column holding the teacher's own prompt (text replacing the last
    # user message, or a list of messages replacing the whole prompt); the student keeps its
    # prompt and both score the same response. null = the teacher reads the student's prompt.
    teacher_input_key: Optional[str] = None
    # Image+text data (vision-language models; see docs/vlm.md). Largest image accepted, in pixels
    # (width x height, read from the file header before decoding); larger ones are bad images.
    # null = no limit.
    max_image_pixels: Optional[int] = 8192 * 8192
    # What happens to a row whose image is missing, unreadable, larger than max_image_pixels or
    # remote (http; never downloaded): error (one line naming file, row and image) or drop (counted).
    bad_images: BadImages = BadImages.error
    # The text marking an image's place in text content (LLaVA / ShareGPT rows, string messages).
    image_placeholder: str = "<image>"
    # Column of image references for rows whose text uses placeholders or value-less image parts.
    images_key: str = "images"

    def check(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"max_len must be positive, got {self.max_len}")
        for name in ("max_samples", "eval_max_samples", "max_image_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or null, got {value}")
