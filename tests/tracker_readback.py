"""Reading a run's tracker output back from disk, without any server: W&B offline runs and
TensorBoard event files.

The tests use it to check that the trackers got exactly what ``metrics.jsonl`` holds. A W&B run directory keeps
its records (config, history rows, summary) in ``run-<id>.wandb``: a header, then blocks of
32 KiB holding length-prefixed chunks (checksum, length, kind: full, first, middle, last) of
W&B's ``Record`` protocol buffers, which the wandb package itself defines. TensorBoard's event
files are read with TensorBoard's own ``EventAccumulator``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HEADER = b":W&B"
_HEADER_LEN = 7  # ident, magic (2 bytes), version
_CHUNK_HEADER = struct.Struct("<IHB")  # checksum, length, kind
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class WandbRun:
    """What an offline W&B run recorded."""

    name: str = ""
    group: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    # step -> {key: value} (keys of nested values joined with "/")
    history: dict[int, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def wandb_run_dirs(run_dir: str | Path) -> list[Path]:
    """The offline W&B run directories under a kdlib run directory, oldest first."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


def read_wandb_run(directory: str | Path) -> WandbRun:
    """Config, history, summary and media files of one ``offline-run-*`` directory."""
    from wandb.proto import wandb_internal_pb2 as pb

    directory = Path(directory)
    (log_file,) = directory.glob("run-*.wandb")
    run = WandbRun(files=sorted(p for p in (directory / "files").rglob("*") if p.is_file()))
    for record in _records(log_file.read_bytes(), pb.Record):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.name, run.group = record.run.display_name, record.run.run_group
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            row = _items(record.history.item)
            run.history.setdefault(int(record.history.step.num), {}).update(row)
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
    return run


def _records(data: bytes, record_cls: type) -> list[Any]:
    if data[:4] != _HEADER:
        raise ValueError("not a W&B transaction log")
    records, pos, pending = [], _HEADER_LEN, b""
    while pos + _CHUNK_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER.size:  # block trailer: zero padding
            pos += left
            continue
        _, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:
            pos += left  # the rest of this block is padding
            continue
        pos += _CHUNK_HEADER.size
        pending += data[pos : pos + length]
        pos += length
        if kind in (_FULL, _LAST):
            record = record_cls()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(items: Any) -> dict[str, Any]:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json) if item.value_json else None
    return out


def read_tensorboard(log_dir: str | Path) -> dict[str, Any]:
    """Scalars ({tag: {step: value}}), texts ({tag: {step: text}}) and image tags of a log dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in tags.get("scalars", [])}
    texts = {}
    for tag in tags.get("tensors", []):
        events = accumulator.Tensors(tag)
        texts[tag.removesuffix("/text_summary")] = {
            e.step: e.tensor_proto.string_val[0].decode("utf-8") for e in events if e.tensor_proto.string_val
        }
    return {"scalars": scalars, "texts": texts, "images": list(tags.get("images", []))}
