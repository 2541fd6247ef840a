"""Checking the data files of a config before anything heavy loads.

A missing file, a JSON line that does not parse, an undetectable format or a dataset without one
usable row should cost the user seconds, not a model load. This reads each configured dataset
(``data.train``, ``data.eval``), detects its layout and converts its rows to conversations until
one usable row is found (a conversation with a non-empty last message); any bad row met on the way
is reported with its file and row; image+text rows are parsed as such (their images are opened
when the samples are built). Tokenisation, truncation and the per-sample counts come later, still
before any model loads.
"""

from __future__ import annotations

from kdlib.config.schema import DataConfig, DataFormat
from kdlib.data.formats import detect_format, privileged_conversation, row_to_conversation
from kdlib.data.multimodal import data_root, row_holds_images, row_to_vision_conversation
from kdlib.data.sources import load_rows
from kdlib.errors import DataError


def check_data_files(cfg: DataConfig) -> dict[str, DataFormat]:
    """The layout of each configured dataset (``{"data.train": DataFormat.messages, ...}``), after
    checking it as above; DataError naming file and row."""
    found = {}
    specs = [("data.train", cfg.train, cfg.train_split, cfg.max_samples)]
    if cfg.eval:
        specs.append(("data.eval", cfg.eval, cfg.eval_split, cfg.eval_max_samples))
    for key, spec, split, max_rows in specs:
        source = load_rows(spec, split=split, key=key, max_rows=max_rows)
        if len(source.rows) == 0:
            raise DataError(f"{key}: {source.name} has no rows")
        fmt = detect_format(list(source.rows.column_names), cfg, f"{key}: {source.name}")
        for i, row in enumerate(source.rows):
            where = f"{key}: {source.where(i)}"
            if row_holds_images(row, cfg):
                turns = row_to_vision_conversation(row, fmt, cfg, data_root(source.name), where).turns
                if turns and turns[-1].text.strip():
                    break
                continue
            conversation = row_to_conversation(row, fmt, cfg, where)
            if cfg.teacher_input_key:
                privileged_conversation(row, conversation, cfg.teacher_input_key, where)
            if conversation and conversation[-1]["content"].strip():
                break
        else:
            raise DataError(f"{key}: {source.name}: none of its {len(source.rows)} rows has a non-empty message")
        found[key] = fmt
    return found
